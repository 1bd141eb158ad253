"""The round in vLLM's V1 model runner: the one place that hooks that runner, in the order of an
engine step. A V2-runner adapter sits beside this module and shares everything it calls.

``GPUModelRunner`` (``CPUModelRunner`` inherits it) gets one class-level patch, on ``__init__``. A
runner built for any other config runs vLLM's code untouched; a runner built for a ddtree config gets
its :class:`~vllm_ddtree.adapter.state.DDTreeState` (``runner.ddtree_state``), builds
:class:`~vllm_ddtree.adapter.drafter.DDTreeProposer` where DFlash's proposer would be, and is then
patched per instance (all through :mod:`~vllm_ddtree.adapter.patching`):

engine start
* ``initialize_kv_cache``: the target's attention layers are hooked and checked
  (:func:`attach_target_layers`), their caches noted for the commit, the step's kernels warmed up;
  a cost-aware engine gets its step costs (:mod:`~vllm_ddtree.adapter.step_costs`);
* ``_dummy_sampler_run``: vLLM's memory profile (GPU workers always run one, CPU workers for compiled
  models) also reserves the largest tree step (:mod:`~vllm_ddtree.adapter.memory`);

each step
* ``_prepare_inputs`` (3, layout): after vLLM laid the step out, the tree rows' RoPE positions and the
  step's tree metadata (:func:`~vllm_ddtree.adapter.step_layout.prepare_tree_step`), and the attention
  backend's plan for every layer; a step without drafts is laid out as without speculation
  (:func:`laid_out_without_drafts`);
* ``_build_attention_metadata`` (3, attention): that metadata rides on the target layers' attention
  metadata, where the attention hooks (:mod:`~vllm_ddtree.adapter.attention`) read it through vLLM's
  forward context; a step without trees carries none;
* ``rejection_sampler.forward`` (4-5): :class:`~vllm_ddtree.adapter.verifier.TreeVerifier`, verify and
  commit; the drafter's pass then commits its rows and drafts the next trees (1-2);
* ``_get_draft_token_ids_cpu``: vLLM's own host conversion of the drafts hands the scheduler each
  request's nodes up to its first -1 (the nodes the budget did not keep);
* ``take_draft_token_ids``: in a batch with structured outputs the drafts go to the scheduler with
  their parents (:mod:`~vllm_ddtree.adapter.structured_outputs`).
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter import engine_start, patching
from vllm_ddtree.adapter.config import hook_ddtree_runners
from vllm_ddtree.adapter.state import DDTreeState
from vllm_ddtree.adapter.step_layout import attach_tree_metadata, plan_attention, prepare_tree_step
from vllm_ddtree.adapter.structured_outputs import with_parents
from vllm_ddtree.adapter.verifier import TreeVerifier


def install(runner_cls) -> None:
    """The class-level patch of ``runner_cls.__init__`` (idempotent)."""
    from vllm.v1.worker import gpu_model_runner

    from vllm_ddtree.adapter.drafter import DDTreeProposer

    def building(state):
        # The runner builds its drafter by the name DFlashProposer in its module; while a ddtree
        # runner is built that name is our subclass (isinstance checks against DFlash still hold).
        return patching.swapped(gpu_model_runner, "DFlashProposer", DDTreeProposer)

    hook_ddtree_runners(runner_cls, "V1 model runner", building, _patch_instance)


def _patch_instance(runner, state: DDTreeState) -> None:
    if runner.device.type == "cpu" and torch.cpu._is_amx_tile_supported():
        # vLLM 0.32's CPU build runs its AMX attention kernel ("amx" ISA, bf16) without asking the OS
        # for AMX permission; in a process where nothing else asked first it dies of SIGILL (seen with
        # head_dim 32, in vLLM's own engines too). ddtree engines keep that ISA, so they ask.
        torch.cpu._init_amx()
    chain = runner.rejection_sampler
    patching.wrap(chain, "forward", lambda chain_forward: TreeVerifier(state, chain_forward, chain.sampler))

    def initialize_kv_cache(original):
        def hooked(*args, **kwargs):
            original(*args, **kwargs)
            attach_target_layers(runner, state)
            engine_start.set_up_budget(state, runner)

        return hooked

    def _dummy_sampler_run(original):
        def hooked(*args, **kwargs):
            output = original(*args, **kwargs)
            engine_start.reserve_tree_step(state, runner, runner.drafter._draft_attn_layer_names)
            return output

        return hooked

    def _prepare_inputs(original):
        def hooked(*args, **kwargs):
            scheduler_output = kwargs["scheduler_output"] if "scheduler_output" in kwargs else args[0]
            if scheduler_output.scheduled_spec_decode_tokens:
                out = original(*args, **kwargs)
            else:
                out = laid_out_without_drafts(runner, original, args, kwargs)
            state.structured_outputs = scheduler_output.has_structured_output_requests
            num_reqs = runner.input_batch.num_reqs
            prepare_tree_step(state, scheduled_drafts(out[1], runner.device), runner.input_batch.req_ids,
                              runner.positions,
                              runner.query_start_loc.gpu, runner.seq_lens,
                              runner.input_batch.block_table[state.target.kv_group].get_device_tensor(num_reqs),
                              num_reqs)
            plan_attention(state)
            return out

        return hooked

    def _build_attention_metadata(original):
        def hooked(*args, **kwargs):
            attn_metadata, common = original(*args, **kwargs)
            attach_tree_metadata(state, attn_metadata)
            return attn_metadata, common

        return hooked

    def _get_draft_token_ids_cpu(original):
        def hooked(*args, **kwargs):
            # Nodes a request does not verify are -1 at the end of its row; the scheduler gets the rest.
            # This is vLLM's own per-request host conversion of the drafts (after its one sync).
            lists, req_ids = original(*args, **kwargs)
            return [ids[: ids.index(-1)] if -1 in ids else ids for ids in lists], req_ids

        return hooked

    def take_draft_token_ids(original):
        def hooked(*args, **kwargs):
            # A batch with structured outputs: the scheduler builds their grammar rows per node, so the
            # drafts go with their parents (read after vLLM's own sync of the drafts, one copy).
            drafts = original(*args, **kwargs)
            if drafts is None or not state.structured_outputs or state.drafted is None:
                return drafts
            return with_parents(drafts, state.drafted.tree.parents.tolist())

        return hooked

    for hook in (initialize_kv_cache, _dummy_sampler_run, _prepare_inputs, _build_attention_metadata,
                 _get_draft_token_ids_cpu, take_draft_token_ids):
        patching.wrap(runner, hook.__name__, hook)


def laid_out_without_drafts(runner, prepare_inputs, args, kwargs):
    """``_prepare_inputs`` for a step in which no request has drafts (prefills; a cost-aware engine
    decoding plainly), laid out as an engine without speculation lays it out.

    vLLM 0.32/0.33 give every step of a speculative engine zero-draft speculative metadata, which the
    rest of the step then carries (the rejection path's inputs, the drafter's padded-input
    preparation): ~0.4 ms a step on a CPU, a share of what plain decoding would cost over an engine
    without speculation. ``_prepare_inputs`` reads ``speculative_config`` only to choose that layout
    (``use_spec_decode``, the same code in both releases), so it sees None for this call; the step's
    attention metadata, sampling and drafter pass still run as a speculative engine's (the drafter
    takes vLLM's own no-metadata path, its context rows unchanged). Hybrid targets, whose recurrent
    attention needs the zero-draft rows, are refused (``support``)."""
    speculative_config, runner.speculative_config = runner.speculative_config, None
    try:
        return prepare_inputs(*args, **kwargs)
    finally:
        runner.speculative_config = speculative_config


def scheduled_drafts(spec_decode_metadata, device) -> torch.Tensor | None:
    """The drafts the scheduler kept for each request of the step ``[R]``, or None if it kept none."""
    if spec_decode_metadata is None or not any(spec_decode_metadata.num_draft_tokens):
        return None
    cu_drafts = spec_decode_metadata.cu_num_draft_tokens.to(device, torch.int64)
    return cu_drafts - torch.cat([cu_drafts.new_zeros(1), cu_drafts[:-1]])


def attach_target_layers(runner, state: DDTreeState) -> None:
    """Engine start on the V1 runner: :func:`~vllm_ddtree.adapter.engine_start.attach_target_layers`
    with the runner's layers, KV cache groups and model."""
    drafter_layers = getattr(runner.drafter, "_draft_attn_layer_names", None)
    if drafter_layers is None:
        raise RuntimeError("ddtree cannot tell the drafter's attention layers from the target's in this vLLM")
    engine_start.attach_target_layers(state, runner.compilation_config.static_forward_context, drafter_layers,
                                      runner.kv_cache_config.kv_cache_groups, runner.model_config, runner.device)
