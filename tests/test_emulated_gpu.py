"""The GPU engine path end to end: ddtree engines on vLLM's TRITON_ATTN backend (vLLM's V1 runner), our
Triton kernels and vLLM's run by Triton's interpreter on CPU tensors (tests/emulated_gpu.py; TRITON_ATTN's
own attention kernels as plain torch), against the same emulated engine without speculation.

What these engines run is what a GPU engine runs (the GPU attention hook over the paged cache, the
tree-attention kernel with split-K, the one-launch tree build, the KV commit kernel, the engine-start
warm-up, the memory reservation in vLLM's profiling run, step costs timed on vLLM's dummy runs), except
what only CUDA has (vllm_ddtree/adapter/cuda_only.py): CUDA graphs, timing, device properties.

The interpreter costs seconds per engine step, so every job runs once, in one process, started with the
session (conftest.py's ``emulated``), with a handful of short requests; each test reads its jobs' results.
"""

import pytest

from emulated_jobs import Jobs

PROMPTS = ["alpha beta", "the tree of draft", "gamma delta token verify commit",
           "commit the draft of a tree and verify the token alpha beta gamma delta"]

# Different lengths, so that the batch shrinks as requests finish (and the split-K choice changes).
GREEDY = [{"temperature": 0, "max_tokens": n, "ignore_eos": True} for n in (24, 8, 16, 12)]

# The fixed-budget B = 16 engine's batch adds a structured-output request (a choice: JSON answers take
# too many interpreted steps) and one with logprobs.
FEATURE_PROMPTS = PROMPTS + ["beta beta gamma the", "of of"]
FEATURES = GREEDY + [{"temperature": 0, "max_tokens": 16, "structured": "choice"},
                     {"temperature": 0, "max_tokens": 12, "ignore_eos": True, "logprobs": 3}]

SEEDED = [{"temperature": 1.0, "max_tokens": 16, "ignore_eos": True, "seed": 11 + i} for i in range(3)]

STRUCTURED = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}

MAX_NUM_SEQS = 4

# Chunked prefill with a token budget below the longest prompt, and a cache of 5 usable blocks of 16
# slots for four requests of up to ~55 tokens plus their trees' lookahead: the scheduler chunks that
# prompt and preempts.
MIXED = dict(enable_chunked_prefill=True, max_num_batched_tokens=24, block_size=16, num_gpu_blocks_override=6,
             max_model_len=80)
MIXED_PROMPTS = PROMPTS[:3] + [PROMPTS[3] + " " + PROMPTS[3]]
MIXED_GREEDY = [GREEDY[0]] * len(PROMPTS)

# Step costs where a row costs a hundredth of a step: the cost-aware budget keeps the likelier nodes.
MIDDLE_ROWS = {"step": {"1": 0.01, "4096": 0.01 + 4095 * 1e-4}, "draft": {"1": 0.001, "256": 0.001}}


def ddtree(budget: int, policy: str = "fixed") -> dict:
    return {"method": "ddtree", "num_speculative_tokens": budget, "ddtree_budget": policy}


def jobs() -> dict:
    greedy = {"target": "models", "prompts": PROMPTS, "params": GREEDY, "engine": {"max_num_seqs": MAX_NUM_SEQS}}
    features = {"target": "models", "prompts": FEATURE_PROMPTS, "params": FEATURES,
                "engine": {"max_num_seqs": 8, **STRUCTURED}}
    mixed = {"target": "models", "prompts": MIXED_PROMPTS, "params": MIXED_GREEDY,
             "engine": {"max_num_seqs": MAX_NUM_SEQS, **MIXED}}
    return {
        "plain": {**features, "spec": None},
        "fixed16": {**features, "spec": ddtree(16)},
        "fixed4": {**greedy, "spec": ddtree(4)},
        "fixed64": {**greedy, "spec": ddtree(64)},
        "cost_aware16": {**greedy, "spec": {**ddtree(16, "cost-aware"), "ddtree_step_costs": MIDDLE_ROWS}},
        # Step costs measured at engine start (the subprocess's HOME is empty: no cached table).
        "cost_measured16": {"target": "models", "prompts": PROMPTS[:2], "params": [GREEDY[1]] * 2,
                            "engine": {"max_num_seqs": MAX_NUM_SEQS}, "spec": ddtree(16, "cost-aware")},
        "mixed_plain": {**mixed, "spec": None},
        "mixed16": {**mixed, "spec": ddtree(16)},
        "seeded16": {"target": "flat", "prompts": PROMPTS[:3], "params": SEEDED,
                     "engine": {"max_num_seqs": MAX_NUM_SEQS}, "spec": ddtree(16)},
    }


def start(targets: dict, root) -> Jobs:
    """Every job in one process, started now (conftest's ``emulated``)."""
    return Jobs(jobs(), targets, root, {})


def job(emulated, name):
    return emulated.job(name)


@pytest.mark.parametrize("name", ["fixed4", "fixed16", "fixed64", "cost_aware16"])
def test_greedy_equals_the_engine_without_speculation(emulated, name):
    plain, tree = job(emulated, "plain"), job(emulated, name)
    assert tree["tokens"][: len(PROMPTS)] == plain["tokens"][: len(PROMPTS)]
    drafts, nodes = tree["metrics"]["vllm:spec_decode_num_drafts"], tree["metrics"]["vllm:spec_decode_num_draft_tokens"]
    assert drafts > 0
    if name != "fixed4":  # the tiny target's ten likely tokens sit at depth 1: B >= 10 accepts most steps
        assert tree["metrics"]["vllm:spec_decode_num_accepted_tokens"] >= 0.5 * drafts
    if name == "cost_aware16":
        assert nodes < 16 * drafts  # the budget cut the trees


def test_cost_aware_engine_with_measured_costs(emulated):
    plain, tree = job(emulated, "plain"), job(emulated, "cost_measured16")
    assert tree["tokens"] == [[seq[0][:8]] for seq in plain["tokens"][:2]]  # whether or not a tree paid


def test_cost_aware_engine_times_its_steps_on_the_gpu_path(emulated):
    # The step costs are measured at engine start (no table, no cache), on vLLM's dummy runs with
    # their attention (the GPU backends' DUMMY_RUN_ATTENTION), at every grid point.
    measured = job(emulated, "cost_measured16")["measured_costs"]
    assert len(measured) == 1
    step, draft = measured[0]
    rows = MAX_NUM_SEQS * 17
    assert sorted(map(int, step)) == [1, 2, 4, 8, 16, 32, 64, rows]
    assert sorted(map(int, draft)) == [1, 2, MAX_NUM_SEQS]
    assert all(seconds > 0 for table in (step, draft) for seconds in table.values())


def test_structured_output_and_logprobs_on_trees(emulated):
    plain, tree = job(emulated, "plain"), job(emulated, "fixed16")
    assert tree["tokens"] == plain["tokens"]
    assert tree["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0
    want, got = plain["logprobs"][-1][0], tree["logprobs"][-1][0]
    assert len(got) == len(want) == 12
    for want_position, got_position in zip(want, got):
        assert [t for t, _ in got_position] == [t for t, _ in want_position]
        assert [v for _, v in got_position] == pytest.approx([v for _, v in want_position], abs=1e-4)


def test_chunked_prefill_and_preemption(emulated):
    plain, tree = job(emulated, "mixed_plain"), job(emulated, "mixed16")
    assert tree["metrics"]["vllm:num_preemptions"] > 0
    assert tree["prompt_tokens"][-1] > MIXED["max_num_batched_tokens"]  # its prefill is chunked
    assert tree["tokens"] == plain["tokens"]
    assert tree["tokens"][0] == job(emulated, "plain")["tokens"][0]  # the same 24 tokens as in a roomy engine


def test_seeded_sampling_as_on_the_cpu_backend(emulated, flat):
    # The same seeded requests on vLLM's CPU backend (its attention kernel, our dense tree path and
    # host-side tree build and commit): the same tokens.
    from vllm import SamplingParams

    from tiny_engines import generate

    tree = job(emulated, "seeded16")
    cpu, _ = generate(flat, PROMPTS[:3], [SamplingParams(**p) for p in SEEDED],
                      spec={"method": "ddtree", "num_speculative_tokens": 16}, max_num_seqs=MAX_NUM_SEQS)
    assert tree["tokens"] == cpu
    assert len({tuple(t[0]) for t in cpu}) == 3  # really sampled: the three answers differ


SPECULATIVE = ["fixed4", "fixed16", "fixed64", "cost_aware16", "cost_measured16", "mixed16", "seeded16"]


@pytest.mark.parametrize("name", SPECULATIVE)
def test_engine_start_compiles_every_kernel_variant(emulated, name):
    # Every launch of our kernels during requests has a compile key (Triton's CUDA specialization)
    # that some launch at engine start already had: no request waits for a compile on a GPU.
    result = job(emulated, name)
    assert result["uncompiled"] == []
    assert result["launched"] == ["kv_commit", "merge_splits", "tree_attention", "tree_build"]


@pytest.mark.parametrize("name", SPECULATIVE)
def test_profiling_run_reserves_the_tree_step(emulated, name):
    # Once, in vLLM's memory profile before the first request: max_num_seqs trees drafted, as many
    # verified as one step's token budget holds (vLLM's default budget holds them all).
    spec = jobs()[name]
    seqs, budget = spec["engine"]["max_num_seqs"], spec["spec"]["num_speculative_tokens"]
    batched = spec["engine"].get("max_num_batched_tokens")
    result = job(emulated, name)
    assert len(result["reservations"]) == 1
    phase, drafted, verified = result["reservations"][0]
    assert phase == "start" and drafted == seqs
    assert verified == (max(1, min(seqs, batched // (budget + 1))) if batched else seqs)


def test_split_k_count_follows_the_batch(emulated):
    # On the emulated 8-multiprocessor device: four 65-row trees fill it unsplit, one or two are split.
    assert job(emulated, "fixed64")["splits"] == [1, 2]
