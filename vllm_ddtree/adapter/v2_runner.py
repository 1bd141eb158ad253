"""The round in vLLM's Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``): the one place that
hooks that runner, in the order of an engine step. It shares with :mod:`~vllm_ddtree.adapter.v1_runner`
everything it calls: the step layout, the attention hooks, the tree verifier's core and the KV commit.

``GPUModelRunner`` (V2's; the CPU worker's V2 ``CPUModelRunner`` inherits it) gets one class-level
patch, on ``__init__``. A runner built for any other config runs vLLM's code untouched; a runner
built for a ddtree config gets its :class:`~vllm_ddtree.adapter.state.DDTreeState`
(``runner.ddtree_state``), builds :class:`~vllm_ddtree.adapter.v2_drafter.DDTreeSpeculator` where
V2 would build DFlash's speculator, and is then patched per instance:

engine start
* ``load_model``: vLLM's rejection sampler gives way to
  :class:`~vllm_ddtree.adapter.verifier.V2TreeVerifier` (V2 offers no hook for it in any release);
* ``initialize_kv_cache``: the target's attention layers are hooked and checked, the step warmed up
  (:func:`~vllm_ddtree.adapter.engine_start.attach_target_layers`);
* ``_dummy_sampler_run``: vLLM's memory profile also reserves the largest tree step
  (:mod:`~vllm_ddtree.adapter.memory`);

each step
* ``prepare_attn`` (3, layout): V2 derives the step's KV slots from its sequential positions; after
  that, the tree rows' RoPE positions and the step's tree metadata
  (:func:`~vllm_ddtree.adapter.step_layout.prepare_tree_step`) and the attention backend's plan;
* ``model_state.prepare_attn`` (3, attention): that metadata rides on the target layers' attention
  metadata, where the attention hooks (:mod:`~vllm_ddtree.adapter.attention`) read it;
* the rejection sampler's call (4-5): verify and commit; the drafter's pass (1-2) then commits its
  rows and drafts the next trees, whose B tokens a request V2 lays out next step after its root.

V2 hands the scheduler placeholder drafts (their ids stay on the device) and verifies B rows per
request every step: the fixed budget. CUDA graphs: ddtree engines run PIECEWISE (``adapter/config``),
where attention stays outside the captured pieces; the drafter then runs eagerly (V2's DFlash graphs
are FULL only).
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter import engine_start, patching
from vllm_ddtree.adapter.config import hook_ddtree_runners
from vllm_ddtree.adapter.state import DDTreeState
from vllm_ddtree.adapter.step_layout import attach_tree_metadata, plan_attention, prepare_tree_step
from vllm_ddtree.adapter.verifier import V2TreeVerifier


def install(runner_cls) -> None:
    """The class-level patch of V2's ``runner_cls.__init__`` (idempotent)."""
    from vllm.v1.worker.gpu import model_runner

    from vllm_ddtree.adapter.v2_drafter import DDTreeSpeculator

    def building(state):
        def init_speculator(vllm_config, device, req_states):
            return DDTreeSpeculator(vllm_config, device, state)

        # V2 builds its speculator by the name init_speculator in its module (0.32/0.33: a fixed choice
        # by method; 0.34: the class the method's config names, which for "ddtree" is the same one).
        return patching.swapped(model_runner, "init_speculator", init_speculator)

    hook_ddtree_runners(runner_cls, "Model Runner V2", building, _patch_instance)


def _patch_instance(runner, state: DDTreeState) -> None:
    def load_model(original):
        def hooked(*args, **kwargs):
            original(*args, **kwargs)
            verifier = V2TreeVerifier(state, runner.rejection_sampler, runner.sampler, runner.req_states,
                                      state.options.budget)
            patching.replace(runner, "rejection_sampler", verifier,
                             stands_in_for="vllm.v1.worker.gpu.spec_decode.rejection_sampler.RejectionSampler.__call__")
            patching.wrap(runner.model_state, "prepare_attn", model_state_prepare_attn)
            patching.wrap(runner.sampler, "add_request", lambda add: sampler_add_request(add, verifier))

        return hooked

    def sampler_add_request(original, verifier):
        def hooked(req_idx, sampling_params):
            original(req_idx, sampling_params)
            verifier.add_request(req_idx, sampling_params)

        return hooked

    def model_state_prepare_attn(original):
        def hooked(*args, **kwargs):
            attn_metadata = original(*args, **kwargs)
            attach_tree_metadata(state, attn_metadata)
            return attn_metadata

        return hooked

    def initialize_kv_cache(original):
        def hooked(*args, **kwargs):
            original(*args, **kwargs)
            engine_start.attach_target_layers(state, runner.compilation_config.static_forward_context,
                                              runner.speculator.draft_attn_layer_names,
                                              runner.kv_cache_config.kv_cache_groups, runner.model_config,
                                              runner.device)
            engine_start.set_up_budget(state, runner)

        return hooked

    def _dummy_sampler_run(original):
        def hooked(*args, **kwargs):
            output = original(*args, **kwargs)
            engine_start.reserve_tree_step(state, runner, runner.speculator.draft_attn_layer_names)
            return output

        return hooked

    def prepare_attn(original):
        def hooked(input_batch):
            block_tables, slot_mappings = original(input_batch)
            num_reqs = input_batch.num_reqs
            num_draft = None
            if input_batch.num_draft_tokens > 0:
                # Each request's logits rows are its root and its drafts (V2's layout), on the device.
                cu_logits = input_batch.cu_num_logits[: num_reqs + 1].to(torch.int64)
                num_draft = cu_logits[1:] - cu_logits[:-1] - 1
            prepare_tree_step(state, num_draft, input_batch.req_ids, input_batch.positions,
                              input_batch.query_start_loc, input_batch.seq_lens,
                              block_tables[state.target.kv_group][:num_reqs], num_reqs)
            plan_attention(state)
            return block_tables, slot_mappings

        return hooked

    def take_draft_token_ids(original):
        def hooked():
            drafts = original()  # vLLM's (placeholders of width B, or ids where it copied them)
            ours, runner.speculator.scheduler_drafts = runner.speculator.scheduler_drafts, None
            return drafts if drafts is None or ours is None else ours.draft_token_ids()

        return hooked

    for hook in (load_model, initialize_kv_cache, _dummy_sampler_run, prepare_attn, take_draft_token_ids):
        patching.wrap(runner, hook.__name__, hook)
