"""Round steps 1 and 2 in vLLM: vLLM's DFlash drafter, its per-depth logits turned into token trees.

:class:`DDTreeProposer` is what a ddtree engine's runner builds where vLLM's ``DFlashProposer`` would
be (other engines keep DFlash's own class). One drafter pass yields logits ``[R, D, V]`` for the
D = block_size - 1 positions after each request's root; :func:`vllm_ddtree.tree.build_tree` picks the
B best nodes, the cost-aware budget (:func:`vllm_ddtree.budget.kept_nodes`) may keep fewer, and their
tokens (parents before children, -1 for slots not verified) go to the scheduler as the B draft
tokens ``[R, B]``, while the trees stay on the device in the runner's
:class:`~vllm_ddtree.adapter.state.DDTreeState` for the next step's layout and verification.

Before drafting, the pass commits its own input rows after a verified tree step
(:func:`vllm_ddtree.adapter.verifier.commit_drafter_inputs`). When the cost-aware budget finds that no
tree pays, the pass only keeps its context K/V (:meth:`DDTreeProposer._keep_context`; on a CPU the rows of
several steps are written in one pass, and vLLM's next-token preparation, which such a pass does not
read, is skipped) until the engine probes again (:class:`~vllm_ddtree.adapter.state.DraftSchedule`).
"""

from __future__ import annotations

import inspect

import torch
from vllm.v1.spec_decode.dflash import DFlashProposer

from vllm_ddtree.adapter import patching
from vllm_ddtree.adapter.config import ddtree_options
from vllm_ddtree.adapter.state import DraftedTrees
from vllm_ddtree.adapter.verifier import commit_drafter_inputs
from vllm_ddtree.budget import kept_nodes
from vllm_ddtree.tree import build_tree

_PROPOSE = inspect.signature(DFlashProposer.propose)


class DDTreeProposer(DFlashProposer):
    def __init__(self, vllm_config, device, runner=None, *args, **kwargs):
        options = ddtree_options(vllm_config)
        # DFlash sizes its query buffers for num_speculative_tokens rows per request; the drafter
        # always drafts D rows, and B may be smaller (a full batch would overrun them). Only the
        # proposer sees D: the scheduler and the verifier keep B.
        with patching.swapped(vllm_config.speculative_config, "num_speculative_tokens", options.depth):
            super().__init__(vllm_config, device, runner, *args, **kwargs)
        self.budget, self.depth = options.budget, options.depth
        self.ddtree_runner = runner
        self.ddtree_state = runner.ddtree_state
        # The pass's logits, from _sample_draft_tokens (which DFlash's propose calls) to propose; None
        # outside a propose call.
        self._pass_logits: torch.Tensor | None = None
        # Context rows of steps without drafts whose K/V is not written yet (see _keep_context), and
        # the batch they were gathered in.
        self._context_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._context_batch: list[str] | None = None

    def propose(self, *args, **kwargs):
        call = _PROPOSE.bind(self, *args, **kwargs)
        inputs = call.arguments
        state = self.ddtree_state
        step = state.step
        if step is not None and step.accepted_nodes is not None:
            commit_drafter_inputs(step, [inputs["target_hidden_states"]], inputs["target_positions"])
        num_reqs = inputs["next_token_ids"].shape[0]
        if not state.schedule.drafts_now():
            # Trees do not pay at this batch: keep the drafter's context (its K/V of this step's
            # tokens, which later drafts attend to) and draft nothing.
            self._keep_context(inputs["target_hidden_states"], inputs["target_positions"],
                               inputs["common_attn_metadata"], self.ddtree_runner.input_batch.req_ids[:num_reqs])
            return torch.empty(num_reqs, 0, dtype=torch.int64, device=inputs["next_token_ids"].device)
        self._write_context()  # before the pass writes (and reads) its own
        inputs["num_speculative_tokens"] = self.depth
        try:
            super().propose(*call.args[1:], **call.kwargs)
            logits = self._pass_logits
        finally:
            self._pass_logits = None
        tree = build_tree(logits.view(num_reqs, self.depth, -1), self.budget,
                          builder=state.target.backend.TREE_BUILDER)
        if state.costs is not None:
            tree = tree.cut(kept_nodes(tree.scores, state.costs, calibration=state.calibration.value))
        state.drafted = DraftedTrees(tree, self.ddtree_runner.input_batch.req_ids[:num_reqs])
        # -1 marks the slots a request does not verify (unused, or not worth their rows): the runner
        # hands the scheduler each row up to its first -1.
        return tree.token_ids

    def prepare_next_token_ids_padded(self, sampled_token_ids, *args, **kwargs):
        if self.ddtree_state.schedule.next_pass_drafts():
            return super().prepare_next_token_ids_padded(sampled_token_ids, *args, **kwargs)
        # This step's pass only keeps the drafter's context: propose reads no next token, and a ddtree
        # engine schedules synchronously (support.py turns async scheduling off), so nothing else
        # does. vLLM's preparation (a host loop over the requests and a kernel; ~0.3 ms a step on a
        # CPU, 0.4% of plain decoding at 4 requests) is skipped; the sampled tokens stand in for it.
        sampled = sampled_token_ids[:, 0].to(torch.int32)
        return sampled, torch.ones_like(sampled)

    def _keep_context(self, hidden_states, positions, common_attn_metadata, req_ids) -> None:
        """Keeps this step's rows for the drafter's context K/V, as DFlash's drafting pass begins by
        writing it (same projection, positions and slots), without the pass itself: no query forward,
        no LM head. The rows of up to the backend's ``CONTEXT_WRITE_STEPS`` steps of one batch are
        written together (:meth:`_write_context`), which reads the drafter's projections once."""
        # The step's own slots in the drafter's KV cache group (whose metadata this is): the rows are
        # the step's tokens, in order, one each.
        slots = common_attn_metadata.slot_mapping[: positions.shape[0]].to(torch.int64, copy=True)
        # The batch changed (a request finished, was preempted or joined): the gathered rows go now,
        # before any row of this step, since a slot of a request that left may belong to a request of
        # this step, whose own write must come after.
        if self._context_batch is not None and list(req_ids) != self._context_batch:
            self._write_context()
        self._context_rows.append((hidden_states.clone(), positions.clone(), slots))
        self._context_batch = list(req_ids)
        if len(self._context_rows) >= self.ddtree_state.target.backend.CONTEXT_WRITE_STEPS:
            self._write_context()

    def _write_context(self) -> None:
        """Writes the drafter's context K/V of the rows :meth:`_keep_context` gathered, in one pass."""
        if not self._context_rows:
            return
        hidden, positions, slots = (torch.cat(parts) for parts in zip(*self._context_rows))
        self._context_rows, self._context_batch = [], None
        self.model.precompute_and_store_context_kv(self.model.combine_hidden_states(hidden), positions, slots)

    def _sample_draft_tokens(self, hidden_states: torch.Tensor, sampling_metadata, *args, **kwargs):
        # DDTree needs the whole per-depth distribution, not a sample of it; DFlash's own token ids
        # are never used, so none are computed (an argmax over the vocabulary costs what the top-k does).
        self._pass_logits = self.model.compute_logits(hidden_states)
        return torch.zeros(hidden_states.shape[0], dtype=torch.int64, device=hidden_states.device), None
