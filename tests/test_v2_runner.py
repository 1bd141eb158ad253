"""ddtree on vLLM's Model Runner V2 (vllm_ddtree/adapter/v2_runner.py): vLLM 0.32's V2 runner in live
engines on the CPU build, with its own Triton kernels interpreted (tests/emulated_gpu.py), on vLLM's CPU
attention backend (the runner vLLM 0.34 gives CPU users) and on TRITON_ATTN (the GPU engine path: our
Triton kernels too), against the same engine without speculation.

The requests run on a target whose answers depend on the whole context (``context_pair``): a tree
position, mask or KV commit gone wrong changes them. Most jobs run one batch of every request feature
(tests/emulated_jobs.py: penalties, min_tokens, bad words, allowed tokens, sample and prompt
logprobs, JSON schema, regex and choice constraints, a stop string, max_tokens 1 and 2, a prompt
ending near max_model_len, a seeded sampled request) at fixed budgets of 4, 16 and 64 and under the
cost-aware budget. The jobs of each backend run in one process per backend, started with the
session (conftest.py); each test reads its jobs' results.
"""

import os

import pytest

from emulated_jobs import (CUT_COSTS, DEAR_COSTS, FEATURE_ENGINE, FEATURES, GREEDY, PROMPTS, VERIFIED, Jobs,
                           assert_rows_equal, ddtree, feature_job, greedy_job, rows, sampled_job)

HERE = os.path.dirname(os.path.abspath(__file__))

# Chunked prefill below the longest prompt and a cache of 80-96 usable slots (5 blocks of 16, or 3 of
# 32: vLLM's CPU attention takes multiples of 32) for four requests of up to ~55 tokens and their trees'
# lookahead: the scheduler chunks that prompt and preempts (as in tests/test_emulated_gpu.py).
MIXED = dict(enable_chunked_prefill=True, max_num_batched_tokens=24, max_model_len=80)
MIXED_CACHE = {"TRITON_ATTN": dict(block_size=16, num_gpu_blocks_override=6),
               "CPU_ATTN": dict(block_size=32, num_gpu_blocks_override=4)}
MIXED_TOKENS = {"TRITON_ATTN": 24, "CPU_ATTN": 40}  # with 32-slot blocks, longer answers to run out of them
MIXED_PROMPTS = PROMPTS[:3] + [PROMPTS[3] + " " + PROMPTS[3]]

SEEDS = [11, 12, 2**62]  # vLLM's V2 runner keeps seeds as int64: one past 2**63 - 1 fails it, with or without ddtree
SAMPLES = 600  # the sampled-distribution check of tests/test_sampling.py: first three tokens
PROCESSED = {"logprobs_mode": "processed_logprobs"}


def seeded(seed):
    return {"temperature": 1.0, "top_p": 0.9, "max_tokens": 16, "ignore_eos": True, "seed": seed}


def jobs(backend: str) -> dict:
    mixed_greedy = [{"temperature": 0, "max_tokens": MIXED_TOKENS[backend], "ignore_eos": True}] * len(PROMPTS)
    mixed = {"target": "context", "prompts": MIXED_PROMPTS, "params": mixed_greedy,
             "engine": {"max_num_seqs": 4, **MIXED, **MIXED_CACHE[backend]}}
    # Both backends: the feature batch at B = 16; B = 64 and the cost-aware budget on CPU_ATTN with the
    # feature batch too, on TRITON_ATTN (whose tree kernel runs interpreted) on the plain greedy rows.
    cut = ddtree(16, "cost-aware", ddtree_step_costs=CUT_COSTS)
    out = {"plain": feature_job(None), "fixed16": feature_job(ddtree(16)),
           "greedy_plain": greedy_job(None), "greedy16": greedy_job(ddtree(16)),
           "mixed_plain": {**mixed, "spec": None}, "mixed16": {**mixed, "spec": ddtree(16)}}
    if backend == "TRITON_ATTN":
        out.update({"greedy64": greedy_job(ddtree(64)), "greedy_cut16": greedy_job(cut)})
    else:
        mixed_order = [p for prompt in reversed(PROMPTS[:3]) for p in (prompt, "alpha")]
        mixed_params = [p for s in reversed(SEEDS) for p in (seeded(s), seeded(None))]
        out.update({
            "fixed4": feature_job(ddtree(4)), "fixed64": feature_job(ddtree(64)), "cut16": feature_job(cut),
            "dear16": feature_job(ddtree(16, "cost-aware", ddtree_step_costs=DEAR_COSTS)),
            "processed_plain": feature_job(None, **PROCESSED), "processed16": feature_job(ddtree(16), **PROCESSED),
            "measured16": greedy_job(ddtree(16, "cost-aware")),
            "seeded": {"target": "flat", "prompts": PROMPTS[:3], "params": [seeded(s) for s in SEEDS],
                       "engine": {"max_num_seqs": 4}, "spec": ddtree(16)},
            "seeded_reordered": {"target": "flat", "prompts": mixed_order, "params": mixed_params,
                                 "engine": {"max_num_seqs": 6, "seed": 1}, "spec": ddtree(16)},
            "seeded_other": {"target": "flat", "prompts": PROMPTS[:3], "params": [seeded(s + 1000) for s in SEEDS],
                             "engine": {"max_num_seqs": 4}, "spec": ddtree(16)},
            "sampled_plain": sampled_job(None, 1.0, 1, SAMPLES), "sampled16": sampled_job(ddtree(16), 1.0, 2, SAMPLES),
            "sampled_colder16": sampled_job(ddtree(16), 0.6, 2, SAMPLES),
        })
    return out


def start(targets: dict, tmp_path_factory) -> dict:
    """Both backends' jobs, each in a process of its own, started now (conftest's ``v2_engines``)."""
    return {backend: Jobs(jobs(backend), targets, tmp_path_factory.mktemp(f"v2_{backend}"),
                          {"EMULATED_RUNNER": "v2", "EMULATED_ATTENTION": backend, "OMP_NUM_THREADS": "1"})
            for backend in ("CPU_ATTN", "TRITON_ATTN")}


def job(v2_engines, backend, name):
    return v2_engines[backend].job(name)


@pytest.mark.parametrize("backend, name", [("CPU_ATTN", "fixed4"), ("CPU_ATTN", "fixed16"), ("CPU_ATTN", "fixed64"),
                                           ("TRITON_ATTN", "fixed16")])
def test_greedy_and_request_features_equal_the_engine_without_speculation(v2_engines, backend, name):
    plain, tree = job(v2_engines, backend, "plain"), job(v2_engines, backend, name)
    assert_rows_equal(rows(tree), rows(plain), VERIFIED)
    metrics = tree["metrics"]
    drafts, budget = metrics["vllm:spec_decode_num_drafts"], int(name[5:])
    # B nodes a request and step, but where the scheduler cut a tree: at the end of max_model_len ("long").
    assert 0.9 * budget * drafts < metrics["vllm:spec_decode_num_draft_tokens"] <= budget * drafts
    if budget >= 16:
        assert metrics["vllm:spec_decode_num_accepted_tokens"] >= 0.5 * drafts


def test_request_features_change_the_answers(v2_engines):
    # Each feature row differs from the plain greedy answer to its prompt, as each feature makes it.
    plain = rows(job(v2_engines, "CPU_ATTN", "plain"))
    greedy = [plain[f"greedy{i}"]["tokens"] for i in range(4)]
    assert len({tuple(g[:12]) for g in greedy}) == len(PROMPTS)  # every prompt its own answer
    assert plain["penalties"]["tokens"] != greedy[0][:24]
    assert 2 in greedy[1][:2] and len(plain["min_tokens"]["tokens"]) >= 12
    assert 4 in greedy[2] and 4 not in plain["bad_words"]["tokens"]
    assert set(plain["allowed"]["tokens"]) <= {2, 3, 5, 7, 9} and plain["allowed"]["tokens"] != greedy[3]
    assert plain["stop"]["finish"] == "stop" and len(plain["stop"]["tokens"]) < 24
    assert [len(plain[n]["tokens"]) for n in ("short1", "short2", "long")] == [1, 2, 8]
    assert plain["choice"]["text"] in ["&*'%(###", "%%%&&&", "!()!", "yes"]
    assert len(plain["allowed"]["prompt_logprobs"]) > 1 and len(plain["penalties"]["logprobs"]) == 24


def test_triton_attn_engines_equal_cpu_attn_engines(v2_engines):
    # The emulated GPU backend (vLLM's TRITON_ATTN: its two kernels in torch, ours interpreted) answers
    # as vLLM's CPU backend does, with and without trees.
    for name in ("plain", "fixed16"):
        assert_rows_equal(rows(job(v2_engines, "TRITON_ATTN", name)), rows(job(v2_engines, "CPU_ATTN", name)),
                          VERIFIED)


def test_greedy_equals_the_engine_without_speculation_on_triton_attn(v2_engines):
    # B = 64 and the cost-aware budget (trees cut) through the GPU backend's path, our kernels.
    plain = job(v2_engines, "TRITON_ATTN", "greedy_plain")["tokens"]
    for name in ("greedy16", "greedy64", "greedy_cut16"):
        assert job(v2_engines, "TRITON_ATTN", name)["tokens"] == plain, name
    metrics = job(v2_engines, "TRITON_ATTN", "greedy_cut16")["metrics"]
    assert 0 < metrics["vllm:spec_decode_num_draft_tokens"] < 8 * metrics["vllm:spec_decode_num_drafts"]


def test_cost_aware_budget_cuts_trees_and_stays_lossless(v2_engines):
    plain, cut = job(v2_engines, "CPU_ATTN", "plain"), job(v2_engines, "CPU_ATTN", "cut16")
    assert_rows_equal(rows(cut), rows(plain), VERIFIED)
    metrics = cut["metrics"]
    drafts = metrics["vllm:spec_decode_num_drafts"]
    assert 0 < metrics["vllm:spec_decode_num_draft_tokens"] < 8 * drafts  # a few nodes a tree, not 16
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0


def test_cost_aware_engine_decoding_plainly_samples_as_without_speculation(v2_engines):
    # No tree pays: nothing is drafted, and every request, the seeded sampled one too, is decoded by
    # vLLM's own sampler exactly as without speculation. (vLLM's scheduler pads a request's first
    # decode step after a wait, here a structured one's grammar compile, with B placeholder drafts of
    # its own: counted as one draft, in which nothing can be accepted.)
    plain, dear = job(v2_engines, "CPU_ATTN", "plain"), job(v2_engines, "CPU_ATTN", "dear16")
    assert_rows_equal(rows(dear), rows(plain), list(FEATURES))
    metrics = dear["metrics"]
    assert metrics.get("vllm:spec_decode_num_drafts", 0) <= 2 and metrics.get("vllm:spec_decode_num_accepted_tokens", 0) == 0


def test_cost_aware_step_costs_are_measured_at_engine_start(v2_engines):
    # Without a table, V2's dummy steps are timed at start (the target with the drafter's pass skipped,
    # the pass alone), at every grid point, once.
    plain, measured = job(v2_engines, "CPU_ATTN", "greedy_plain"), job(v2_engines, "CPU_ATTN", "measured16")
    assert measured["tokens"] == plain["tokens"]
    (step, draft), = measured["measured_costs"]
    assert sorted(map(int, step)) == [1, 2, 4, 8, 16, 32, 64, 68] and sorted(map(int, draft)) == [1, 2, 4]
    assert all(seconds > 0 for table in (step, draft) for seconds in table.values())


def test_processed_logprobs_follow_each_nodes_processing(v2_engines):
    # logprobs_mode processed_logprobs: each emitted token's row processed as V2's sampler processes
    # it (its penalties with the node's path as history), as without speculation, and unlike raw.
    plain, tree = rows(job(v2_engines, "CPU_ATTN", "processed_plain")), rows(job(v2_engines, "CPU_ATTN", "processed16"))
    assert_rows_equal(tree, plain, VERIFIED)
    raw = rows(job(v2_engines, "CPU_ATTN", "plain"))
    assert tree["penalties"]["tokens"] == raw["penalties"]["tokens"]
    assert tree["penalties"]["logprobs"] != raw["penalties"]["logprobs"]


def test_v2_runs_the_same_trees_as_v1(v2_engines, context_pair):
    # The same engine on the V1 runner (vLLM's CPU backend): the same answers and the same acceptance,
    # step for step (the same drafter passes give the same trees, the same verdicts).
    from vllm import SamplingParams

    from tiny_engines import run

    v1 = run(context_pair, PROMPTS, [SamplingParams(**p) for p in GREEDY], spec=ddtree(16), max_num_seqs=4)
    v2 = job(v2_engines, "CPU_ATTN", "greedy16")
    assert v2["tokens"] == v1.tokens == job(v2_engines, "CPU_ATTN", "greedy_plain")["tokens"]
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


def test_v2_engine_start_reserves_the_tree_step(v2_engines):
    # vLLM's V2 memory profile (its CPU runner profiles too) reserves the largest tree step, once.
    for backend in ("CPU_ATTN", "TRITON_ATTN"):
        reservations = job(v2_engines, backend, "fixed16")["reservations"]
        assert [r[0] for r in reservations] == ["start"] and reservations[0][1] == FEATURE_ENGINE["max_num_seqs"]


def test_triton_attn_runs_our_kernels(v2_engines):
    result = job(v2_engines, "TRITON_ATTN", "greedy64")
    assert result["launched"] == ["kv_commit", "merge_splits", "tree_attention", "tree_build"]
    assert result["uncompiled"] == []  # every live launch's compile key was compiled at engine start


# Each worker of a multi-process engine emulates from its start (tests/emulated_gpu.py as sitecustomize).
SITECUSTOMIZE = """import sys
sys.path.insert(0, {tests!r})
import emulated_gpu
emulated_gpu.install(v2_runner=True, attention="CPU_ATTN")
"""


def test_tensor_parallel_greedy_equals_no_speculation(v2_engines, models, flat, context_pair, tmp_path):
    # tensor_parallel_size=2 on V2 (two CPU workers, one core each): the tree verifier, the KV commit
    # and the drafter run on every rank, alike.
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(tests=HERE))
    env = {"PYTHONPATH": str(tmp_path), "EMULATED_RUNNER": "v2", "EMULATED_ATTENTION": "CPU_ATTN",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    tp2 = Jobs({"tp2": greedy_job(ddtree(16), tensor_parallel_size=2)}, {"context": context_pair}, tmp_path, env)
    result = tp2.job("tp2")
    assert result["tokens"] == job(v2_engines, "CPU_ATTN", "greedy_plain")["tokens"]
    metrics = result["metrics"]
    assert metrics["vllm:spec_decode_num_accepted_tokens"] >= 0.5 * metrics["vllm:spec_decode_num_drafts"] > 0
