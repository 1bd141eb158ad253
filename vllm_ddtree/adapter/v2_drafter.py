"""Round steps 1 and 2 on vLLM's Model Runner V2: its DFlash speculator, its per-depth logits turned
into token trees, and what the scheduler learns of them.

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
``[R, D, V]`` of every depth go to :func:`vllm_ddtree.tree.build_tree`, and the cost-aware budget
(:func:`vllm_ddtree.budget.kept_nodes`) may keep fewer nodes. The trees stay in the engine's
:class:`~vllm_ddtree.adapter.state.DDTreeState` for the next step's layout and verifier; the runner
gets their tokens (parents before children). When the cost-aware budget finds that no tree pays, a
pass stores the drafter's context K/V only (DFlash does that before its query forward) until the
engine probes again (:class:`~vllm_ddtree.adapter.state.DraftSchedule`).

The scheduler: V2 tells it B placeholder drafts a request and keeps the ids on the device. That
stands for a fixed budget; where the scheduler needs more (each request's node count under the
cost-aware budget, none in a pass that kept the context only, and each node's parent for the grammar
rows of structured outputs), the pass leaves a :class:`SchedulerDrafts`, copied to the host without
waiting, which the runner's ``take_draft_token_ids`` hands on instead.
"""

from __future__ import annotations

import contextlib

import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.worker.gpu.spec_decode.dflash.speculator import DFlashSpeculator

from vllm_ddtree.adapter import cuda_only, patching
from vllm_ddtree.adapter.config import ddtree_options
from vllm_ddtree.adapter.state import DDTreeState, DraftedTrees
from vllm_ddtree.adapter.verifier import commit_drafter_inputs
from vllm_ddtree.budget import kept_nodes
from vllm_ddtree.tree import build_tree


class SchedulerDrafts:
    """One pass's drafts as the scheduler takes them: per request, its kept nodes' tokens (and,
    with ``parents``, each node's parent: 0 the root, i the i-th node), read on the host."""

    def __init__(self, req_ids: list[str], token_ids: torch.Tensor | None, parents: torch.Tensor | None = None):
        self.req_ids = req_ids
        self._tokens = self._parents = self._event = None
        if token_ids is not None:  # None: the pass drafted nothing
            self._tokens, self._event = cuda_only.copy_to_host(token_ids)
            if parents is not None:
                self._parents, self._event = cuda_only.copy_to_host(parents)

    def draft_token_ids(self):
        """vLLM's ``DraftTokenIds`` (with parents: the structured-outputs hook's ``TreeDraftTokenIds``)."""
        from vllm.v1.outputs import DraftTokenIds

        from vllm_ddtree.adapter.structured_outputs import TreeDraftTokenIds

        if self._tokens is None:
            return DraftTokenIds(self.req_ids, [[] for _ in self.req_ids])
        cuda_only.wait_for(self._event)
        rows = [ids[: ids.index(-1)] if -1 in ids else ids for ids in self._tokens.tolist()]
        if self._parents is None:
            return DraftTokenIds(self.req_ids, rows)
        parents = [p[: len(ids)] for p, ids in zip(self._parents.tolist(), rows)]
        return TreeDraftTokenIds(self.req_ids, rows, parents)


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
        self.scheduler_drafts: SchedulerDrafts | None = None  # None: vLLM's own placeholders stand
        self._pass_tree = None
        self._drafts = True  # this pass drafts (False: it stores the drafter's context K/V only)
        self._timing = None  # step-cost timing: "skip" every pass, or "record" the next pass's arguments
        self.recorded_pass = None

    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                *args, dummy_run: bool = False, **kwargs) -> torch.Tensor:
        num_reqs = input_batch.num_reqs
        if self._timing == "skip":
            return self.tree_tokens[:num_reqs]
        if self._timing == "record":
            self.recorded_pass = ((input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                                   *args), {**kwargs, "dummy_run": dummy_run})
        state = self.ddtree_state
        step = state.step
        if not dummy_run and step is not None and step.accepted_nodes is not None:
            commit_drafter_inputs(step, [last_hidden_states, *(aux_hidden_states or [])], input_batch.positions)
        self._drafts = dummy_run or state.schedule.drafts_now()
        try:
            super().propose(input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states, *args,
                            dummy_run=dummy_run, **kwargs)
            tree = self._pass_tree
        finally:
            self._pass_tree = None
        if dummy_run:  # vLLM's profiling, warm-up and graph-capture runs: no trees
            return self.tree_tokens[:num_reqs]
        req_ids = list(input_batch.req_ids[:num_reqs])
        if tree is None:
            # A pass that kept the context only; or (0.34) a step after which vLLM schedules no drafts.
            state.drafted = None
            self.scheduler_drafts = SchedulerDrafts(req_ids, None)
            return self.tree_tokens[:num_reqs]
        if state.costs is not None:
            tree = tree.cut(kept_nodes(tree.scores, state.costs, calibration=state.calibration.value))
        state.drafted = DraftedTrees(tree, req_ids)
        self.tree_tokens[:num_reqs] = tree.token_ids.clamp(min=0)
        structured = input_batch.has_structured_output_reqs
        self.scheduler_drafts = (SchedulerDrafts(req_ids, tree.token_ids, tree.parents if structured else None)
                                 if state.costs is not None or structured else None)
        return self.tree_tokens[:num_reqs]

    def _generate_draft(self, num_reqs: int, num_tokens_padded: int, attn_metadata, slot_mappings,
                        num_tokens_across_dp, cudagraph_runtime_mode: CUDAGraphMode = CUDAGraphMode.NONE) -> None:
        if not self._drafts:  # DFlash stored this step's context K/V already
            return
        # DFlash's own query forward; then the whole per-depth distribution, not a sample of it.
        hidden = self._run_model(num_tokens_padded, attn_metadata, slot_mappings, num_tokens_across_dp,
                                 cudagraph_runtime_mode)
        rows = self.sample_indices[: num_reqs * self.depth]
        logits = self.model.compute_logits(hidden[rows]).view(num_reqs, self.depth, -1)
        target = self.ddtree_state.target
        # Before engine start hooks the target (vLLM's profiling run) the builder is the backend's
        # default for the device: its result is dropped.
        builder = target.backend.TREE_BUILDER if target is not None else None
        self._pass_tree = build_tree(logits, self.budget, builder=builder)

    @contextlib.contextmanager
    def timing(self, mode: str):
        """Step-cost timing (:mod:`~vllm_ddtree.adapter.step_costs`): inside, every pass is skipped
        (``"skip"``: a dummy step times the target alone) or runs and leaves its arguments in
        :attr:`recorded_pass` (``"record"``: the pass can then be timed alone)."""
        self._timing = mode
        try:
            yield
        finally:
            self._timing = None
