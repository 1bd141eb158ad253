"""The jobs both Model Runner V2 test files give the emulated engines of tests/emulated_gpu.py (vLLM
0.32's V2 runner: tests/test_v2_runner.py; vLLM 0.34.0: tests/test_vllm034.py), and the one way they
run them: every job of a file in one process (an engine each), started as early as the file's
fixture asks, read when a test needs it.

A job is JSON: {"target", "drafter", "prompts", "params" (SamplingParams arguments per prompt;
"structured" names a tests/tiny_engines.py constraint), "engine" (LLM arguments), "spec"}. Its result
(:func:`emulated_gpu.run_job`) has tokens, texts, logprobs, vLLM's counters and our kernels' launches.
No vLLM import here: the 0.34 jobs run in another environment.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))

PROMPTS = ["alpha beta", "the tree of draft", "gamma delta token verify commit",
           "commit the draft of a tree and verify the token alpha beta gamma delta"]
MAX_MODEL_LEN = 512  # tests/tiny_engines.py's ENGINE

# A cost table that makes the cost-aware budget keep a few nodes a request (trees cut), and one under
# which no node pays (plain decoding, the drafter keeping its context only).
CUT_COSTS = {"step": {"1": 0.010, "4": 0.0101, "8": 0.0104, "64": 0.05, "4096": 5.0},
             "draft": {"1": 0.001, "256": 0.002}}
DEAR_COSTS = {"step": {"1": 0.01, "2": 10.0, "4096": 1e5}, "draft": {"1": 0.0005, "256": 0.0005}}


def ddtree(budget: int, policy: str = "fixed", custom_method: bool = False, **options) -> dict:
    """ddtree's speculative config (without the drafter's path): its options as top-level keys on
    vLLM 0.32/0.33, in ``speculator_options`` on 0.34 (its custom-method interface)."""
    own = {"ddtree_budget": policy, **options}
    return ({"method": "ddtree", "num_speculative_tokens": budget, "speculator_options": own} if custom_method
            else {"method": "ddtree", "num_speculative_tokens": budget, **own})


def _greedy(max_tokens: int, **more) -> dict:
    return {"temperature": 0, "max_tokens": max_tokens, **more}


GREEDY = [_greedy(n, ignore_eos=True) for n in (32, 12, 24, 16)]


# One batch of every request feature, each in a row of its own beside plain greedy rows, each chosen
# to change its answer (checked by the tests against the plain rows of the same prompt): name ->
# (prompt, SamplingParams arguments). "long" ends 2 tokens short of max_model_len: its last trees
# must be cut to fit.
FEATURES = {
    **{f"greedy{i}": (p, g) for i, (p, g) in enumerate(zip(PROMPTS, GREEDY))},
    "penalties": (PROMPTS[0], _greedy(24, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0,
                                      repetition_penalty=1.5, logprobs=2)),
    "min_tokens": (PROMPTS[1], _greedy(20, min_tokens=12, stop_token_ids=[2])),  # "!": greedy says it early
    "bad_words": (PROMPTS[2], _greedy(20, ignore_eos=True, bad_words=["#", "!!"])),
    "allowed": (PROMPTS[3], _greedy(16, ignore_eos=True, allowed_token_ids=[2, 3, 5, 7, 9], prompt_logprobs=2)),
    "json": ("alpha beta gamma", _greedy(60, structured="json")),
    "regex": ("beta gamma", _greedy(40, structured="regex")),
    "choice": ("tree", _greedy(12, structured="choice")),
    "stop": (PROMPTS[0], _greedy(24, stop=[")"])),
    "short1": (PROMPTS[1], _greedy(1)),
    "short2": (PROMPTS[2], _greedy(2)),
    "long": ({"prompt_token_ids": [2 + i % 10 for i in range(MAX_MODEL_LEN - 10)]}, _greedy(8, ignore_eos=True)),
    # Sampled with a seed: equal to no speculation only where no tree is verified.
    "seeded": (PROMPTS[0], {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 12, "ignore_eos": True}),
}
FEATURE_ENGINE = {"max_num_seqs": 16,
                  "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}


def feature_job(spec: dict | None, **engine) -> dict:
    names = list(FEATURES)
    return {"target": "context", "prompts": [FEATURES[n][0] for n in names],
            "params": [FEATURES[n][1] for n in names], "engine": {**FEATURE_ENGINE, **engine}, "spec": spec}


def rows(result: dict) -> dict:
    """A feature job's result per request name: its tokens, text, finish reason and logprobs."""
    return {name: {"tokens": result["tokens"][i][0], "text": result["texts"][i][0], "finish": result["finish"][i][0],
                   "logprobs": result["logprobs"][i][0], "prompt_logprobs": result["prompt_logprobs"][i]}
            for i, name in enumerate(FEATURES)}


# The rows a tree engine must answer as the engine without speculation does (a seeded sampled row
# follows its own noise, which differs where trees are verified).
VERIFIED = [name for name in FEATURES if name != "seeded"]


def assert_rows_equal(got: dict, want: dict, names, tolerance: float = 1e-3) -> None:
    """Tokens, texts, finish reasons and (within ``tolerance``) logprobs of the named rows."""
    for name in names:
        g, w = got[name], want[name]
        assert (g["tokens"], g["text"], g["finish"]) == (w["tokens"], w["text"], w["finish"]), name
        for key in ("logprobs", "prompt_logprobs"):
            assert len(g[key]) == len(w[key]), (name, key)
            for a, b in zip(g[key], w[key]):
                assert [t for t, _ in a] == [t for t, _ in b], (name, key)
                assert all(math.isclose(x, y, abs_tol=tolerance) for (_, x), (_, y) in zip(a, b)), (name, key)


def greedy_job(spec: dict | None, **engine) -> dict:
    return {"target": "context", "prompts": PROMPTS, "params": GREEDY, "engine": {"max_num_seqs": 4, **engine},
            "spec": spec}


def sampled_job(spec: dict | None, temperature: float, n: int, samples: int) -> dict:
    """``samples`` answers of 3 tokens to one prompt on the flat target, ``n`` a request."""
    return {"target": "flat", "prompts": ["alpha beta"] * (samples // n), "spec": spec,
            "params": [{"temperature": temperature, "max_tokens": 3, "ignore_eos": True, "n": n}] * (samples // n),
            "engine": {"max_num_seqs": 256}}


# At most this many job processes at once: each holds up to ~5 GB (its engines, one after another),
# and they run beside the in-process tests' engines on a 24 GiB machine. Two keep both cores busy
# once the in-process tests are done.
_RUNNING = threading.BoundedSemaphore(2)


class Jobs:
    """``jobs`` running in one process of ``python`` (this environment's by default), started now or,
    while two other job processes run, as soon as one of them ends; :meth:`results` waits for them.
    ``targets``: the models the jobs name ("context", "flat") -> (target, drafter)."""

    def __init__(self, jobs: dict, targets: dict, root, env: dict, python: str = sys.executable,
                 simulate: str = ""):
        self.names = set(jobs)
        named = {}
        for name, job in jobs.items():
            if "target" in job:
                target, drafter = targets[job["target"]]
                job = {**job, "target": target, "drafter": drafter}
            named[name] = job
        request, self.out = root / "jobs.json", root / "results.json"
        first = next((job for job in named.values() if "target" in job), {"target": "", "drafter": ""})
        request.write_text(json.dumps({"target": first["target"], "drafter": first["drafter"], "jobs": named,
                                       "simulate": simulate}))
        environment = {k: v for k, v in {**os.environ, "HOME": str(root), **env}.items() if v is not None}
        self.log = root / "engines.log"  # a file: a pipe nobody reads yet would stall the engines
        command = [python, os.path.join(HERE, "emulated_gpu.py"), str(request), str(self.out)]

        def run():
            with _RUNNING, open(self.log, "w") as log:
                # At a lower priority: the in-process tests running meanwhile come first.
                subprocess.run(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: os.nice(10))

        self._runner = threading.Thread(target=run, daemon=True)
        self._runner.start()
        self._results = None

    def results(self, timeout: float = 3000) -> dict:
        if self._results is None:
            self._runner.join(timeout)
            assert not self._runner.is_alive(), f"the jobs did not end in {timeout:.0f} s"
            tail = self.log.read_text()[-6000:]
            assert self.out.exists(), tail
            self._results = json.loads(self.out.read_text())
            assert set(self._results) == self.names, tail
        return self._results

    def job(self, name: str) -> dict:
        result = self.results()[name]
        assert "error" not in result, result.get("error")
        return result
