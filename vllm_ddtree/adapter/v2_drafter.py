"""Round steps 1 and 2 on vLLM's Model Runner V2: its DFlash speculator, its per-depth logits turned
into token trees.

:class:`DDTreeSpeculator` is what a ddtree engine's V2 runner builds where vLLM's
``DFlashSpeculator`` would be. DFlash's ``num_speculative_steps`` means two things that a tree
splits: the drafter's width D (its query rows, sample buffers and draft graphs: the drafter always
drafts the D = block_size - 1 positions after each root) and the verifier's width B (the
``draft_tokens [max_reqs, B]`` the runner copies into its request states, which the next step lays
out as each request's rows after its root). The speculator is built with D; it hands the runner B
tokens per request from its own buffer.

Its pass: the commit of its input rows after a verified tree step
(:func:`vllm_ddtree.adapter.verifier.commit_drafter_inputs`: DFlash takes each request's first
``query_len - num_rejected`` rows as its context, a chain), then DFlash's own input preparation,
context K/V and query forward, then, where DFlash samples one token per depth, the logits
``[R, D, V]`` of every depth go to :func:`vllm_ddtree.tree.build_tree`. The trees stay in the
engine's :class:`~vllm_ddtree.adapter.state.DDTreeState` for the next step's layout and verifier;
the runner gets their tokens (parents before children).
"""

from __future__ import annotations

import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.worker.gpu.spec_decode.dflash.speculator import DFlashSpeculator

from vllm_ddtree.adapter import patching
from vllm_ddtree.adapter.config import ddtree_options
from vllm_ddtree.adapter.state import DDTreeState, DraftedTrees
from vllm_ddtree.adapter.verifier import commit_drafter_inputs
from vllm_ddtree.tree import build_tree


class DDTreeSpeculator(DFlashSpeculator):
    _speculator_name = "DDTree"

    def __init__(self, vllm_config, device: torch.device, state: DDTreeState):
        options = ddtree_options(vllm_config)
        with patching.swapped(vllm_config.speculative_config, "num_speculative_tokens", options.depth):
            super().__init__(vllm_config, device)
        self.budget, self.depth = options.budget, options.depth
        self.ddtree_state = state
        # The B nodes of each request's tree that the runner verifies next step ([R, B], returned by
        # propose; -1 slots of a smaller tree read as token 0: their rows are outside the tree).
        self.tree_tokens = torch.zeros(self.max_num_reqs, self.budget, dtype=torch.int64, device=device)
        self._pass_tree = None

    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                *args, dummy_run: bool = False, **kwargs) -> torch.Tensor:
        state = self.ddtree_state
        step = state.step
        if not dummy_run and step is not None and step.accepted_nodes is not None:
            commit_drafter_inputs(step, [last_hidden_states, *(aux_hidden_states or [])], input_batch.positions)
        num_reqs = input_batch.num_reqs
        try:
            super().propose(input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states, *args,
                            dummy_run=dummy_run, **kwargs)
            tree = self._pass_tree
        finally:
            self._pass_tree = None
        if dummy_run or tree is None:
            # vLLM's profiling, warm-up and graph-capture runs; or (0.34) a step after which vLLM
            # schedules no drafts, where DFlash only stores its context K/V: no trees.
            if not dummy_run:
                state.drafted = None
            return self.tree_tokens[:num_reqs]
        state.drafted = DraftedTrees(tree, list(input_batch.req_ids[:num_reqs]))
        self.tree_tokens[:num_reqs] = tree.token_ids.clamp(min=0)
        return self.tree_tokens[:num_reqs]

    def _generate_draft(self, num_reqs: int, num_tokens_padded: int, attn_metadata, slot_mappings,
                        num_tokens_across_dp, cudagraph_runtime_mode: CUDAGraphMode = CUDAGraphMode.NONE) -> None:
        # DFlash's own query forward; then the whole per-depth distribution, not a sample of it.
        hidden = self._run_model(num_tokens_padded, attn_metadata, slot_mappings, num_tokens_across_dp,
                                 cudagraph_runtime_mode)
        rows = self.sample_indices[: num_reqs * self.depth]
        logits = self.model.compute_logits(hidden[rows]).view(num_reqs, self.depth, -1)
        target = self.ddtree_state.target
        # Before engine start hooks the target (vLLM's profiling run) the builder is the backend's
        # default for the device: its result is dropped.
        fused = target.backend.FUSED_TREE_BUILD if target is not None else logits.is_cuda
        self._pass_tree = build_tree(logits, self.budget, fused=fused)
