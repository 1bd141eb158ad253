"""The adapter inside a live engine: no host reads in a step, the engine settings it applies, which
caches the commit moves, the drafter's context after tree steps, the profiling-time reservation."""

import pytest
from tiny_engines import FREE_ROWS, GREEDY, PROMPTS, run
from vllm import SamplingParams

from vllm_ddtree.tools.engine_runs import model_runner


def test_the_adapters_step_functions_read_nothing_back_in_a_live_engine(models, reference, monkeypatch):
    # Issue 14: every device function of a tree step, as the engine calls it on its real inputs, runs
    # under the host-sync guard (tests/host_sync_guard.py): tree bookkeeping and positions, the build
    # and the cost-aware cut, sampling parameters (seeded requests included), the per-node logits
    # processing (penalties, min_tokens, bad words, allowed tokens), verification and its
    # calibration, the commit plan and the drafter's rows. The CPU-only paths around them (the dense
    # CPU attention, the CPU cache copy) read lengths on the host by design and are not guarded.
    import collections

    from host_sync_guard import no_host_sync

    from vllm_ddtree.adapter import drafter, step_layout, v1_runner, verifier
    from vllm_ddtree.budget import AcceptanceCalibration

    calls = collections.Counter()

    def guard(owner, name):
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            calls[name] += 1
            with no_host_sync():
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)

    for owner, name in [(v1_runner, "prepare_tree_step"), (verifier, "_tree_sampling"), (verifier, "node_processing"),
                        (verifier, "verify_tree"), (verifier, "plan_commit"), (drafter, "build_tree"),
                        (drafter, "kept_nodes"), (verifier, "commit_accepted_rows"),
                        (step_layout, "write_tree_positions"), (AcceptanceCalibration, "update")]:
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


def test_engine_config_runs_vllms_runner_choice_and_piecewise_graphs(models, monkeypatch):
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    def config(spec):
        return EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                          speculative_config=spec and {"model": models[1], **spec}).create_engine_config()

    tree, plain = config({"method": "ddtree", "num_speculative_tokens": 8}), config(None)
    assert tree.speculative_config.ddtree.policy == "cost-aware"  # the default budget policy
    # On GPUs vLLM may pick full CUDA graphs; a ddtree engine keeps attention outside them.
    for cfg, want in [(tree, CUDAGraphMode.PIECEWISE), (plain, CUDAGraphMode.FULL_AND_PIECEWISE)]:
        cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        cfg._maybe_override_dynamic_sd_cudagraph_mode()
        assert cfg.compilation_config.cudagraph_mode == want
    # The runner is vLLM's choice, as for any engine: V1 on this CPU build (no Triton), V2 when vLLM's
    # own switch asks for it (tests/test_v2_runner.py runs that, with Triton: vLLM refuses V2 without it).
    assert tree.use_v2_model_runner is plain.use_v2_model_runner is False
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert tree.use_v2_model_runner is plain.use_v2_model_runner is True


def test_kv_commit_moves_the_targets_caches_each_once(models):
    from tiny_models import TARGET_LAYERS
    from vllm_ddtree.adapter.v1_runner import attach_target_layers

    def inspect(llm):
        runner = model_runner(llm)
        state = runner.ddtree_state
        caches = runner.compilation_config.static_forward_context
        drafter_spans = [(c.data_ptr(), c.data_ptr() + c.nbytes) for c in
                         (caches[name].kv_cache for name in runner.drafter._draft_attn_layer_names)]
        in_drafter_cache = [any(a <= c.data_ptr() < b for a, b in drafter_spans) for c in state.target.kv_caches]
        counts = [len(state.target.layers), len(state.target.kv_caches)]
        # Layers that share one cache (vLLM's KV sharing) are moved once.
        layers = list(state.target.layers.values())
        layers[1].kv_cache = layers[0].kv_cache
        attach_target_layers(runner, state)
        return counts, len(state.target.kv_caches), len(drafter_spans), in_drafter_cache

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
    # vLLM sizes the KV cache from its profiling run (every GPU engine, CPU engines that compile), which
    # only runs the chain sampler over one draft per request; ddtree also drafts and verifies there the
    # largest tree step the scheduler can form (max_num_seqs trees drafted; as many verified as
    # max_num_batched_tokens holds). In a live engine: tests/test_emulated_gpu.py.
    import torch
    from vllm_ddtree.adapter.memory import reserve_tree_step_memory

    assert reserve_tree_step_memory(8, 64, 16, 7, 300, torch.float32, "cpu", builder="beams") == (8, 3)
    assert reserve_tree_step_memory(8, 8192, 16, 7, 300, torch.bfloat16, "cpu", builder="beams") == (8, 8)
    assert reserve_tree_step_memory(4, 10, 16, 7, 300, torch.float32, "cpu", builder="beams") == (4, 1)
