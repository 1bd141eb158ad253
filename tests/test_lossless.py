"""ddtree's output equals the target's own in vLLM: greedy answers equal an engine without speculation's
(and vLLM's DFlash chain's) at every budget, budget policy and scheduler condition."""

import json

import pytest
import torch
from tiny_engines import DEAR_ROWS, FREE_ROWS, generate, run
from vllm import SamplingParams

from vllm_ddtree.tools.engine_runs import model_runner


@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_greedy_equals_no_speculation(models, reference, budget):
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": budget})
    assert tokens == reference
    drafts = counters["vllm:spec_decode_num_drafts"]
    assert drafts > 0 and counters["vllm:spec_decode_num_draft_tokens"] == drafts * budget
    if budget >= 16:  # the ten likely tokens all sit at depth 1: every step accepts a node
        assert (counters["vllm:spec_decode_num_accepted_tokens"] or 0) >= 0.9 * drafts


@pytest.mark.parametrize("path", ["kernel", "dense"])
def test_both_cpu_attention_paths_are_lossless(models, reference, monkeypatch, path):
    # Tree steps take the C++ kernel, or with VLLM_DDTREE_CPU_KERNEL=0 the dense-mask SDPA path (the
    # AMX layout's, and that of machines without a compiler); the layers record which one ran.
    from vllm_ddtree.adapter.attention import cpu

    taken = []
    for name, label in (("tree_attention_cpu", "kernel"), ("tree_attention_dense", "dense")):
        original = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _f=original, _l=label, **k: taken.append(_l) or _f(*a, **k))
    monkeypatch.setenv("VLLM_DDTREE_CPU_KERNEL", "1" if path == "kernel" else "0")
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 16})
    assert tokens == reference
    assert set(taken) == {path} and counters["vllm:spec_decode_num_accepted_tokens"] > 0


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


def test_cost_aware_budget_with_dear_rows_decodes_plainly(models, reference):
    # A table where a second row costs far more than a token is worth keeps no node: every step emits
    # one token per request (no draft is ever verified), the output is the target's, and the drafter
    # drafts only to probe, after 8 steps, then 16, 32, 64 (the others keep its context, no drafting).
    # No step builds vLLM's speculative metadata or enters its rejection path: a step without drafts
    # is laid out as an engine without speculation lays it out.

    passes, speculative_layouts = [], []

    def count_drafter_passes(llm):
        runner = model_runner(llm)
        drafter = runner.drafter
        propose, calc = drafter.propose, runner._calc_spec_decode_metadata

        def counted(*args, **kwargs):
            drafts = propose(*args, **kwargs)
            passes.append(drafts.shape[1])
            return drafts

        drafter.propose = counted
        runner._calc_spec_decode_metadata = lambda *a, **k: speculative_layouts.append(1) or calc(*a, **k)

    result = run(models, spec={"method": "ddtree", "num_speculative_tokens": 16, "ddtree_budget": "cost-aware",
                               "ddtree_step_costs": DEAR_ROWS}, before=count_drafter_passes)
    assert result.tokens == reference
    assert not result.metrics.get("vllm:spec_decode_num_drafts")
    full = [i for i, width in enumerate(passes) if width > 0]
    assert len(passes) >= 39 and full[:4] == [0, 8, 24, 56][: len(full)] and len(full) <= 3
    assert speculative_layouts == []


def test_context_written_in_batches_drafts_what_step_by_step_writes_do(models, reference, monkeypatch):
    # Decoding plainly, the CPU drafter gathers its context rows and writes their K/V every 32 steps,
    # when the batch changes and before a probe. Its probes must see the K/V that writing every step
    # gives: the same per-depth logits at every full pass, in a batch that requests leave and join
    # (4 at a time out of 8, of different lengths) while rows wait, and in a steady batch of 75 steps.
    from vllm_ddtree.adapter import drafter as drafter_module
    from vllm_ddtree.adapter.attention import cpu

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (120, 45, 120, 120, 80, 30, 10, 60)]
    build = drafter_module.build_tree

    def probes(steps):
        monkeypatch.setattr(cpu, "CONTEXT_WRITE_STEPS", steps)
        seen, writes = [], []
        monkeypatch.setattr(drafter_module, "build_tree", lambda logits, *a, **k: seen.append(logits.clone()) or
                            build(logits, *a, **k))

        def count_writes(llm):
            proposer = model_runner(llm).drafter
            write = proposer._write_context
            proposer._write_context = lambda: writes.append(len(proposer._context_rows)) or write()

        result = run(models, params=params, spec={"method": "ddtree", "num_speculative_tokens": 16,
                                                  "ddtree_budget": "cost-aware", "ddtree_step_costs": DEAR_ROWS},
                     before=count_writes, max_num_seqs=4)
        return result, seen, writes

    batched, batched_logits, batched_writes = probes(32)
    stepwise, stepwise_logits, _ = probes(1)
    assert batched.tokens == stepwise.tokens
    assert len(batched_logits) == len(stepwise_logits) >= 4
    for a, b in zip(batched_logits, stepwise_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert max(batched_writes) == 32 and any(1 < n < 32 for n in batched_writes)  # by count, and by batch


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
                step, drafts, ends = runner.ddtree_state.step, out[1].draft_token_ids.tolist(), out[1].cu_num_draft_tokens
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


def test_moe_target_greedy_equals_no_speculation(models, moe_target):
    plain, _ = generate((moe_target, models[1]))
    tree, counters = generate((moe_target, models[1]), spec={"method": "ddtree", "num_speculative_tokens": 16})
    assert tree == plain
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0


def test_bf16_engine_keeps_vllms_cpu_attention_isa(models, reference):
    # In bf16 on an AMX machine vLLM's CPU attention packs the KV cache for its tile units ("amx" ISA);
    # ddtree reads and commits that layout as it is (it used to force every layer to "vec").
    import torch

    def isas(llm):
        runner = model_runner(llm)
        return {layer.isa for layer in runner.ddtree_state.target.layers.values()}

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
