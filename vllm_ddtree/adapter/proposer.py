"""Round steps 1-2 in vLLM: vLLM's DFlash drafter, its per-depth logits turned into a token tree.

:class:`DDTreeProposer` is built by a ddtree engine's V1 runner where vLLM's ``DFlashProposer`` would
be (:mod:`vllm_ddtree.adapter.runner`; other engines keep DFlash's own class). One drafter pass yields
logits for the D = block_size - 1 positions; :func:`vllm_ddtree.tree.build_tree` picks the B best
nodes, whose tokens (parents before children) go to the scheduler as the B draft tokens, while the
tree itself stays on the device in the runner's :class:`~vllm_ddtree.adapter.runner.DDTreeState` for
next step's positions, mask and verify.

DFlash reads the rows of each request as a chain: the first ``query_len - rejected`` rows are the
accepted context, and every row's position names the drafter-KV slot its context K/V is written to.
After a tree round the accepted path is scattered through the tree and the rows carry tree
positions (root + depth), so rejected nodes would overwrite the accepted positions' drafter KV. The
accepted path's hidden states are therefore moved to the front (the permutation of the KV commit)
and every tree row gets back its sequential position: the drafter then sees exactly the context a
chain step that accepted the same tokens gives it.
"""

from __future__ import annotations

import inspect

import torch
from vllm.v1.spec_decode.dflash import DFlashProposer

from vllm_ddtree.adapter.runner import write_tree_positions
from vllm_ddtree.budget import kept_nodes
from vllm_ddtree.kv_commit import commit_accepted_rows
from vllm_ddtree.tree import build_tree

_PROPOSE = inspect.signature(DFlashProposer.propose)


class DDTreeProposer(DFlashProposer):
    def __init__(self, vllm_config, device, runner=None, *args, **kwargs):
        spec = vllm_config.speculative_config
        # DFlash sizes its query buffers for num_speculative_tokens rows per request; the drafter
        # always drafts D rows, and B may be smaller (a full batch would overrun them). Only the
        # proposer sees D: the scheduler and the verifier keep B.
        budget = spec.num_speculative_tokens
        spec.__dict__["num_speculative_tokens"] = spec.ddtree_depth
        try:
            super().__init__(vllm_config, device, runner, *args, **kwargs)
        finally:
            spec.__dict__["num_speculative_tokens"] = budget
        self.budget = spec.ddtree_max_budget
        self.depth = spec.ddtree_depth
        self.ddtree_runner = runner
        self.ddtree_state = runner._ddtree
        self._draft_logits = None

    def propose(self, *args, **kwargs):
        call = _PROPOSE.bind(self, *args, **kwargs)
        inputs = call.arguments
        step = self.ddtree_state.step
        if step is not None and step.accepted_nodes is not None:
            commit_accepted_rows(inputs["target_hidden_states"], step.root_rows, step.accepted_nodes)
            chain = torch.arange(1, step.tree.max_nodes + 1, device=step.num_draft.device).expand_as(step.tree.depths)
            write_tree_positions(inputs["target_positions"], step, chain)
        state = self.ddtree_state
        num_reqs = inputs["next_token_ids"].shape[0]
        state.full_draft_last_step = state.skip_drafting == 0
        if not state.full_draft_last_step:
            # Trees do not pay at this batch: keep the drafter's context (its K/V of this step's
            # tokens, which later drafts attend to) and draft nothing.
            state.skip_drafting -= 1
            self._keep_context(inputs["target_hidden_states"], inputs["target_positions"],
                               inputs["common_attn_metadata"])
            return torch.empty(num_reqs, 0, dtype=torch.int64, device=inputs["next_token_ids"].device)
        inputs["num_speculative_tokens"] = self.depth
        super().propose(*call.args[1:], **call.kwargs)
        logits, self._draft_logits = self._draft_logits, None
        tree = build_tree(logits.view(num_reqs, self.depth, -1), self.budget)
        if state.costs is not None:
            tree = tree.cut(kept_nodes(tree.scores, state.costs, calibration=state.calibration.value))
        state.remember_trees(tree, self.ddtree_runner.input_batch.req_ids[:num_reqs])
        # -1 marks the slots a request does not verify (unused, or not worth their rows): the runner
        # hands the scheduler each row up to its first -1.
        return tree.token_ids

    def _keep_context(self, hidden_states, positions, common_attn_metadata) -> None:
        """Writes the drafter's K/V of this step's rows, as DFlash's drafting pass begins by doing
        (same projection, positions and slots), without the pass itself: no query forward, no LM head."""
        cad = common_attn_metadata
        rows = torch.arange(positions.shape[0], device=positions.device)
        request = torch.bucketize(rows, cad.query_start_loc[1:].to(torch.int64), right=True)
        blocks = cad.block_table_tensor[request, positions // self.block_size].to(torch.int64)
        slots = blocks * self.block_size + positions % self.block_size
        self.model.precompute_and_store_context_kv(self.model.combine_hidden_states(hidden_states), positions, slots)

    def _sample_draft_tokens(self, hidden_states: torch.Tensor, sampling_metadata, *args, **kwargs):
        # DDTree needs the whole per-depth distribution, not a sample of it; DFlash's own token ids
        # are never used, so none are computed (an argmax over the vocabulary costs what the top-k does).
        self._draft_logits = self.model.compute_logits(hidden_states)
        return torch.zeros(hidden_states.shape[0], dtype=torch.int64, device=hidden_states.device), None
