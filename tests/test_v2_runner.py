"""ddtree on vLLM's Model Runner V2 (vllm_ddtree/adapter/v2_runner.py): vLLM 0.32's V2 runner in live
engines on the CPU build, with its own Triton kernels interpreted (tests/emulated_gpu.py), on vLLM's CPU
attention backend (the runner vLLM 0.34 gives CPU users) and on TRITON_ATTN (the GPU engine path: our
Triton kernels too), against the same engine without speculation.

Greedy equality runs on a target whose answers depend on the whole context (``context_target``): a
tree position, mask or KV commit gone wrong changes them. The jobs of each backend run once, in one
process per backend (:func:`v2_engines`); each test reads its jobs' results.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

PROMPTS = ["alpha beta", "the tree of draft", "gamma delta token verify commit",
           "commit the draft of a tree and verify the token alpha beta gamma delta"]
GREEDY = [{"temperature": 0, "max_tokens": n, "ignore_eos": True} for n in (32, 12, 24, 16)]

# Chunked prefill below the longest prompt and a cache of 80-96 usable slots (5 blocks of 16, or 3 of
# 32: vLLM's CPU attention takes multiples of 32) for four requests of up to ~55 tokens and their trees'
# lookahead: the scheduler chunks that prompt and preempts (as in tests/test_emulated_gpu.py).
MIXED = dict(enable_chunked_prefill=True, max_num_batched_tokens=24, max_model_len=80)
MIXED_CACHE = {"TRITON_ATTN": dict(block_size=16, num_gpu_blocks_override=6),
               "CPU_ATTN": dict(block_size=32, num_gpu_blocks_override=4)}
MIXED_TOKENS = {"TRITON_ATTN": 24, "CPU_ATTN": 40}  # with 32-slot blocks, longer answers to run out of them
MIXED_PROMPTS = PROMPTS[:3] + [PROMPTS[3] + " " + PROMPTS[3]]

SEEDS = [11, 12, 2**62]  # vLLM's V2 runner keeps seeds as int64: one past 2**63 - 1 fails it, with or without ddtree


def seeded(seed):
    return {"temperature": 1.0, "top_p": 0.9, "max_tokens": 16, "ignore_eos": True, "seed": seed}


# The sampled-distribution check of tests/test_sampling.py: first three tokens, 600 samples.
SAMPLES = 600


def sampled(spec, temperature, n):
    return {"target": "flat", "prompts": ["alpha beta"] * (SAMPLES // n), "spec": spec,
            "params": [{"temperature": temperature, "max_tokens": 3, "ignore_eos": True, "n": n}] * (SAMPLES // n),
            "engine": {"max_num_seqs": 256}}


def ddtree(budget: int) -> dict:
    return {"method": "ddtree", "num_speculative_tokens": budget, "ddtree_budget": "fixed"}


def jobs(backend: str) -> dict:
    greedy = {"target": "context", "prompts": PROMPTS, "params": GREEDY, "engine": {"max_num_seqs": 4}}
    mixed_greedy = [{"temperature": 0, "max_tokens": MIXED_TOKENS[backend], "ignore_eos": True}] * len(PROMPTS)
    mixed = {"target": "context", "prompts": MIXED_PROMPTS, "params": mixed_greedy,
             "engine": {"max_num_seqs": 4, **MIXED, **MIXED_CACHE[backend]}}
    out = {"plain": {**greedy, "spec": None}, "fixed16": {**greedy, "spec": ddtree(16)},
           "fixed64": {**greedy, "spec": ddtree(64)},
           "mixed_plain": {**mixed, "spec": None}, "mixed16": {**mixed, "spec": ddtree(16)}}
    if backend == "CPU_ATTN":
        mixed_order = [p for prompt in reversed(PROMPTS[:3]) for p in (prompt, "alpha")]
        mixed_params = [p for s in reversed(SEEDS) for p in (seeded(s), seeded(None))]
        out.update({
            "fixed4": {**greedy, "spec": ddtree(4)},
            "seeded": {"target": "flat", "prompts": PROMPTS[:3], "params": [seeded(s) for s in SEEDS],
                       "engine": {"max_num_seqs": 4}, "spec": ddtree(16)},
            "seeded_reordered": {"target": "flat", "prompts": mixed_order, "params": mixed_params,
                                 "engine": {"max_num_seqs": 6, "seed": 1}, "spec": ddtree(16)},
            "seeded_other": {"target": "flat", "prompts": PROMPTS[:3], "params": [seeded(s + 1000) for s in SEEDS],
                             "engine": {"max_num_seqs": 4}, "spec": ddtree(16)},
            "sampled_plain": sampled(None, 1.0, 1), "sampled16": sampled(ddtree(16), 1.0, 2),
            "sampled_colder16": sampled(ddtree(16), 0.6, 2),
            "logprobs_refused": {"target": "context", "prompts": PROMPTS[:1], "spec": ddtree(16),
                                 "params": [{"temperature": 0, "max_tokens": 4, "logprobs": 2}]},
        })
    return out


@pytest.fixture(scope="session")
def v2_engines(models, flat, context_target, tmp_path_factory):
    """Both backends' jobs, in two processes at once (the machine has two cores; each mostly waits
    on one)."""
    targets = {"context": context_target, "flat": flat[0]}
    running = {}
    for backend in ("CPU_ATTN", "TRITON_ATTN"):
        root = tmp_path_factory.mktemp(f"v2_{backend}")
        request, out = root / "jobs.json", root / "results.json"
        named = {name: {**job, "target": targets[job["target"]]} for name, job in jobs(backend).items()}
        request.write_text(json.dumps({"target": models[0], "drafter": models[1], "jobs": named}))
        env = {**os.environ, "HOME": str(root), "EMULATED_RUNNER": "v2", "EMULATED_ATTENTION": backend,
               "OMP_NUM_THREADS": "1"}
        running[backend] = (subprocess.Popen([sys.executable, os.path.join(HERE, "emulated_gpu.py"), str(request),
                                              str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                             text=True), out)
    results = {}
    for backend, (process, out) in running.items():
        _, stderr = process.communicate(timeout=1800)
        assert out.exists(), stderr[-6000:]
        results[backend] = json.loads(out.read_text())
        assert set(results[backend]) == set(jobs(backend)), stderr[-6000:]
    return results


def job(v2_engines, backend, name):
    result = v2_engines[backend][name]
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.parametrize("backend, name", [("CPU_ATTN", "fixed4"), ("CPU_ATTN", "fixed16"), ("CPU_ATTN", "fixed64"),
                                           ("TRITON_ATTN", "fixed16"), ("TRITON_ATTN", "fixed64")])
def test_greedy_equals_the_engine_without_speculation(v2_engines, backend, name):
    plain, tree = job(v2_engines, backend, "plain"), job(v2_engines, backend, name)
    assert tree["tokens"] == plain["tokens"]
    assert len({tuple(t[0][:12]) for t in plain["tokens"]}) == len(PROMPTS)  # every prompt its own answer
    metrics = tree["metrics"]
    drafts = metrics["vllm:spec_decode_num_drafts"]
    assert metrics["vllm:spec_decode_num_draft_tokens"] == int(name[5:]) * drafts  # V2 verifies B nodes a step
    if name != "fixed4":
        assert metrics["vllm:spec_decode_num_accepted_tokens"] >= 0.5 * drafts


def test_v2_runs_the_same_trees_as_v1(v2_engines, models, context_target):
    # The same engine on the V1 runner (vLLM's CPU backend): the same answers and the same acceptance,
    # step for step (the same drafter passes give the same trees, the same verdicts).
    from vllm import SamplingParams

    from tiny_engines import run

    v1 = run((context_target, models[1]), PROMPTS, [SamplingParams(**p) for p in GREEDY], spec=ddtree(16),
             max_num_seqs=4)
    v2 = job(v2_engines, "CPU_ATTN", "fixed16")
    assert v2["tokens"] == v1.tokens
    for counter in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens"):
        assert v2["metrics"][counter] == v1.metrics[counter]


@pytest.mark.parametrize("backend", ["CPU_ATTN", "TRITON_ATTN"])
def test_chunked_prefill_and_preemption(v2_engines, backend):
    plain, tree = job(v2_engines, backend, "mixed_plain"), job(v2_engines, backend, "mixed16")
    assert tree["metrics"]["vllm:num_preemptions"] > 0
    assert tree["prompt_tokens"][-1] > MIXED["max_num_batched_tokens"]  # its prefill is chunked
    assert tree["tokens"] == plain["tokens"]
    assert tree["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_seeded_sampling_follows_the_seed_not_the_batch(v2_engines):
    # Reordered, with unseeded requests in between, under another engine seed: the same tokens; other
    # seeds: other tokens. (Not the V1 runner's tokens: each request's first token is vLLM's own
    # sampler's, whose noise differs between the runners.)
    first = job(v2_engines, "CPU_ATTN", "seeded")["tokens"]
    reordered = job(v2_engines, "CPU_ATTN", "seeded_reordered")["tokens"]
    other = job(v2_engines, "CPU_ATTN", "seeded_other")["tokens"]
    assert reordered[::2][::-1] == first
    assert len({tuple(t[0]) for t in first}) == len(SEEDS)  # really sampled
    assert all(a != b for a, b in zip(first, other))
    assert job(v2_engines, "CPU_ATTN", "seeded")["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_sampled_distribution_matches_no_speculation(v2_engines):
    # As tests/test_sampling.py on V1: token pairs 2-3 of 600 samples (ddtree with n = 2) against the
    # engine without speculation, and a control at another temperature that the test tells apart.
    from test_sampling import _homogeneity_p

    def pairs(name):
        return [tuple(sample[1:]) for request in job(v2_engines, "CPU_ATTN", name)["tokens"] for sample in request]

    plain, tree, colder = pairs("sampled_plain"), pairs("sampled16"), pairs("sampled_colder16")
    assert len(plain) == len(tree) == SAMPLES
    assert job(v2_engines, "CPU_ATTN", "sampled16")["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, colder) < 1e-3


def test_features_not_served_on_v2_are_refused_on_arrival(v2_engines):
    error = v2_engines["CPU_ATTN"]["logprobs_refused"]["error"]
    assert "ddtree does not support sample logprobs on vLLM's V2 model runner yet" in error
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in error


def test_v2_engine_start_reserves_the_tree_step(v2_engines):
    # vLLM's V2 memory profile (its CPU runner profiles too) reserves the largest tree step, once.
    for backend in ("CPU_ATTN", "TRITON_ATTN"):
        reservations = job(v2_engines, backend, "fixed16")["reservations"]
        assert [r[0] for r in reservations] == ["start"] and reservations[0][1] == 4


def test_triton_attn_runs_our_kernels(v2_engines):
    result = job(v2_engines, "TRITON_ATTN", "fixed64")
    assert result["launched"] == ["kv_commit", "merge_splits", "tree_attention", "tree_build"]


# Each worker of a multi-process engine emulates from its start (tests/emulated_gpu.py as sitecustomize).
SITECUSTOMIZE = """import sys
sys.path.insert(0, {tests!r})
import emulated_gpu
emulated_gpu.install(v2_runner=True, attention="CPU_ATTN")
"""


def test_tensor_parallel_greedy_equals_no_speculation(v2_engines, models, context_target, tmp_path):
    # tensor_parallel_size=2 on V2 (two CPU workers, one core each): the tree verifier, the KV commit
    # and the drafter run on every rank, alike.
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(tests=HERE))
    request, out = tmp_path / "jobs.json", tmp_path / "results.json"
    tp2 = {"target": context_target, "prompts": PROMPTS, "params": GREEDY, "spec": ddtree(16),
           "engine": {"max_num_seqs": 4, "tensor_parallel_size": 2}}
    request.write_text(json.dumps({"target": models[0], "drafter": models[1], "jobs": {"tp2": tp2}}))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path), "EMULATED_RUNNER": "v2",
           "EMULATED_ATTENTION": "CPU_ATTN", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, os.path.join(HERE, "emulated_gpu.py"), str(request), str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=900)
    assert out.exists(), done.stderr[-6000:]
    result = json.loads(out.read_text())["tp2"]
    assert "error" not in result, result.get("error")
    assert result["tokens"] == job(v2_engines, "CPU_ATTN", "plain")["tokens"]
    metrics = result["metrics"]
    assert metrics["vllm:spec_decode_num_accepted_tokens"] >= 0.5 * metrics["vllm:spec_decode_num_drafts"] > 0
