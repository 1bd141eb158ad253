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
  backend's plan for every layer;
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

import functools

import torch

from vllm_ddtree.adapter import attention, patching
from vllm_ddtree.adapter.config import ddtree_options
from vllm_ddtree.adapter.memory import reserve_tree_step_memory
from vllm_ddtree.adapter.state import DDTreeState
from vllm_ddtree.adapter.step_layout import plan_attention, prepare_tree_step
from vllm_ddtree.adapter.structured_outputs import with_parents
from vllm_ddtree.adapter.verifier import TreeVerifier
from vllm_ddtree.budget import AcceptanceCalibration
from vllm_ddtree.tree import build_tree


def install(runner_cls) -> None:
    """The class-level patch of ``runner_cls.__init__`` (idempotent)."""
    from vllm.v1.worker import gpu_model_runner

    from vllm_ddtree.adapter.drafter import DDTreeProposer

    def make(original_init):
        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):
            vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
            options = ddtree_options(vllm_config)
            if options is None:
                return original_init(self, *args, **kwargs)
            self.ddtree_state = DDTreeState(options)
            # The runner builds its drafter by the name DFlashProposer in its module; while a ddtree
            # runner is built that name is our subclass (isinstance checks against DFlash still hold).
            with patching.swapped(gpu_model_runner, "DFlashProposer", DDTreeProposer):
                original_init(self, *args, **kwargs)
            _patch_instance(self, self.ddtree_state)

        return __init__

    patching.wrap(runner_cls, "__init__", make)


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
            if state.options.policy == "cost-aware":
                from vllm.logger import init_logger

                from vllm_ddtree.adapter.step_costs import step_costs

                state.costs = step_costs(runner, state, init_logger("vllm.ddtree"))
                state.costs_host = state.costs.to("cpu")
                state.calibration = AcceptanceCalibration(runner.device)

        return hooked

    def _dummy_sampler_run(original):
        def hooked(*args, **kwargs):
            output = original(*args, **kwargs)
            # Inside vLLM's memory profile (and the GPU worker's sampler warm-up, after the KV cache is
            # allocated: the same peak again): reserve the tree step's peak. The layers are not hooked
            # yet; their backend is known from the model.
            backend = attention.target_backend(runner.compilation_config.static_forward_context,
                                               runner.drafter._draft_attn_layer_names)
            scheduler = runner.scheduler_config
            reserve_tree_step_memory(scheduler.max_num_seqs, scheduler.max_num_batched_tokens,
                                     state.options.budget, state.options.depth,
                                     runner.model_config.get_vocab_size(), runner.model_config.dtype,
                                     runner.device, fused=backend.FUSED_TREE_BUILD)
            return output

        return hooked

    def _prepare_inputs(original):
        def hooked(*args, **kwargs):
            out = original(*args, **kwargs)
            scheduler_output = kwargs["scheduler_output"] if "scheduler_output" in kwargs else args[0]
            state.structured_outputs = scheduler_output.has_structured_output_requests
            num_reqs = runner.input_batch.num_reqs
            prepare_tree_step(state, out[1], runner.input_batch.req_ids, runner.positions,
                              runner.query_start_loc.gpu, runner.seq_lens,
                              runner.input_batch.block_table[state.target.kv_group].get_device_tensor(num_reqs),
                              num_reqs)
            plan_attention(state)
            return out

        return hooked

    def _build_attention_metadata(original):
        def hooked(*args, **kwargs):
            attn_metadata, common = original(*args, **kwargs)
            tree, state.pending_attention = state.pending_attention, None
            if tree is not None:
                for name in state.target.layers:
                    setattr(attn_metadata[name], attention.TREE_METADATA, tree)
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


def attach_target_layers(runner, state: DDTreeState) -> None:
    """Hooks every target attention layer for tree steps (``state.target``) and warms the step up.

    Raises at engine start for a target the tree path cannot serve: layers spread over several KV
    cache groups, or an attention backend or layer feature the tree kernel does not compute. The tree
    build runs once at the engine's shapes (with a GPU backend its Triton kernel compiles, on CPU the
    beams' index grids are made) and the attention backend warms up, so that no live step waits for
    either.
    """
    drafter_layers = getattr(runner.drafter, "_draft_attn_layer_names", None)
    if drafter_layers is None:
        raise RuntimeError("ddtree cannot tell the drafter's attention layers from the target's in this vLLM")
    group_of = {name: i for i, group in enumerate(runner.kv_cache_config.kv_cache_groups)
                for name in group.layer_names if name not in drafter_layers}
    if len(set(group_of.values())) != 1:
        raise ValueError(f'speculative_config method "ddtree" needs the target\'s attention layers in one KV cache '
                         f"group (one block table for the tree); this target has {len(set(group_of.values()))}")
    layers = runner.compilation_config.static_forward_context
    state.target = attention.hook_target_layers({name: layers[name] for name in group_of},
                                                next(iter(group_of.values())))
    budget, depth = state.options.budget, state.options.depth
    vocab = runner.model_config.get_vocab_size()
    build_tree(torch.zeros(1, depth, min(budget, vocab), device=runner.device), budget,
               fused=state.target.backend.FUSED_TREE_BUILD)
    attention.warm_up(state.target, budget, depth, runner.model_config.dtype)
