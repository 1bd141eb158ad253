"""One vLLM engine for one job: build it, generate, read its metrics, tear it down; or one OpenAI
server for the length of a ``with`` block.

The demo, the benchmarks and the engine tests all run engines this way (vLLM's public ``LLM`` API and
its server; vLLM is imported only when a run starts, so the core stays free of it). For tests that
look inside the engine, ``before`` and ``after`` get the ``LLM`` around the generation and
:func:`model_runner` reaches the runner of an in-process engine.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class EngineRun:
    outputs: list                  # vLLM's RequestOutput per prompt
    metrics: dict[str, Any]        # vLLM's metrics by name (counters' values)
    seconds: float                 # wall time of the generation alone (engine start excluded)
    inspected: Any = None          # what ``after`` returned

    @property
    def tokens(self) -> list[list[list[int]]]:
        """Token ids per prompt, per sample (``n`` > 1)."""
        return [[list(c.token_ids) for c in o.outputs] for o in self.outputs]

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for o in self.outputs for c in o.outputs)

    @property
    def target_steps(self) -> int | None:
        """Verify steps of a speculative engine (vLLM's ``spec_decode_num_drafts``)."""
        return self.metrics.get("vllm:spec_decode_num_drafts")

    @property
    def tau(self) -> float:
        """Tokens per target step: 1 + accepted draft tokens per verify step (1.0 without speculation)."""
        steps = self.target_steps
        if not steps:
            return 1.0
        return 1 + (self.metrics.get("vllm:spec_decode_num_accepted_tokens") or 0) / steps

    @property
    def tokens_per_second(self) -> float:
        return self.num_output_tokens / self.seconds


class Engine:
    """A built vLLM engine (``llm``, vLLM's ``LLM``) inside :func:`open_engine`'s block."""

    def __init__(self, llm):
        self.llm = llm

    def generate(self, prompts, params, chat: bool = False) -> EngineRun:
        """Generates ``prompts`` (message lists through ``llm.chat`` if ``chat``) and times it; the
        counters in the result count this generation only."""
        llm = self.llm
        counted_before = _counters(llm)
        start = time.perf_counter()
        outputs = (llm.chat if chat else llm.generate)(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        metrics.update({name: value - counted_before.get(name, 0) for name, value in _counters(llm).items()})
        return EngineRun(outputs, metrics, seconds)


@contextlib.contextmanager
def open_engine(model: str, speculative_config: dict | None = None, **engine):
    """``LLM(model, speculative_config=..., **engine)`` for the block, as an :class:`Engine`; freed after
    it (the handle lets go of the engine, so a caller's name for it keeps nothing alive)."""
    from vllm import LLM

    engine.setdefault("disable_log_stats", False)  # the metrics (spec-decode counters) need vLLM's stats
    handle = Engine(LLM(model=model, speculative_config=speculative_config, **engine))
    try:
        yield handle
    finally:
        # Shut the engine down now, even when an exception's traceback still holds it: its late
        # finalizer would otherwise tear down the parallel groups of whichever engine runs next.
        handle.llm.llm_engine.engine_core.shutdown()
        handle.llm = None
        gc.collect()


def run_engine(model: str, prompts, params, speculative_config: dict | None = None, chat: bool = False,
               warmup=None, before: Callable | None = None, after: Callable | None = None, **engine) -> EngineRun:
    """One engine, one timed generation: optionally ``warmup`` prompts first (untimed), then ``before``
    (gets the LLM), the generation, and ``after`` (its value is the result's ``inspected``)."""
    with open_engine(model, speculative_config, **engine) as built:
        if warmup:
            built.generate(warmup, params if not isinstance(params, list) else params[: len(warmup)], chat)
        if before is not None:
            before(built.llm)
        result = built.generate(prompts, params, chat)
        if after is not None:
            result.inspected = after(built.llm)
        return result


def model_runner(llm):
    """The model runner of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one worker)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def _counters(llm) -> dict[str, float]:
    from vllm.v1.metrics.reader import Counter

    return {m.name: m.value for m in llm.get_metrics() if isinstance(m, Counter)}


@dataclass
class Server:
    url: str
    process: Any
    log_path: str

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


@contextlib.contextmanager
def openai_server(model: str, speculative_config: dict | None = None, args=(), env: dict | None = None,
                  startup_timeout: float = 300.0, python: str | None = None):
    """vLLM's OpenAI server in its own process group (``python -m vllm.entrypoints.openai.api_server``:
    the CPU build's ``vllm`` console script fails on its distribution name), engine in its own process
    as in production; yields a :class:`Server` once ``/health`` answers, stops it afterwards. Its
    output goes to a file (a pipe nobody reads would stall a chatty server). ``python``: the
    interpreter of another environment (default: this one's)."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", "127.0.0.1", "--port", str(port), *args]
    if speculative_config is not None:
        command += ["--speculative-config", json.dumps(speculative_config)]
    environment = {**os.environ, **(env or {})}
    environment.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log.name)
    try:
        deadline = time.time() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=5):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the server did not answer /health in {startup_timeout:.0f} s:\n"
                                       f"{server.log_tail()}")
                time.sleep(1)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()
