"""Round steps 1-2 in vLLM: vLLM's DFlash drafter, its per-depth logits turned into a token tree.

:class:`DDTreeProposer` takes the place of vLLM's ``DFlashProposer`` in the V1 model runner (the runner
builds the class by that name and checks ``isinstance`` against it, so ours is a subclass). For a
config without the ddtree flag it is exactly DFlash. With it, one drafter pass yields logits for the
D = block_size - 1 positions; :func:`vllm_ddtree.tree.build_tree` picks the B best nodes, whose tokens
(parents before children) go to the scheduler as the B draft tokens, while the tree itself stays on the
device in :class:`~vllm_ddtree.adapter.runner.DDTreeState` for next step's positions, mask and verify.

DFlash reads the accepted rows of each request as a chain (the first ``query_len - rejected`` rows);
after a tree round those rows are the accepted path, scattered through the tree, so the target's
hidden states and positions are compacted first with the same permutation as the KV.
"""

from __future__ import annotations

import torch
from vllm.v1.spec_decode.dflash import DFlashProposer

from vllm_ddtree.adapter.config import is_ddtree
from vllm_ddtree.kv_commit import commit_accepted_rows
from vllm_ddtree.tree import build_tree


class DDTreeProposer(DFlashProposer):
    def __init__(self, vllm_config, device, runner=None):
        spec = vllm_config.speculative_config
        self.ddtree = is_ddtree(spec)
        # DFlash sizes its query buffers for num_speculative_tokens rows per request; the drafter
        # always drafts D rows, and B may be smaller (a full batch would overrun them). Only the
        # proposer sees D: the scheduler and the verifier keep B.
        budget = spec.num_speculative_tokens
        if self.ddtree:
            spec.__dict__["num_speculative_tokens"] = spec.ddtree_depth
        try:
            super().__init__(vllm_config, device, runner)
        finally:
            spec.__dict__["num_speculative_tokens"] = budget
        if self.ddtree:
            from vllm_ddtree.adapter.runner import DDTreeState

            self.budget = spec.ddtree_budget
            self.depth = spec.ddtree_depth
            self.ddtree_runner = runner
            self.ddtree_state = DDTreeState.of(runner)
            self._draft_logits = None

    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
        if not self.ddtree:
            return super().propose(num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                                   next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                                   mm_embed_inputs, num_rejected_tokens_gpu, slot_mappings)
        step = self.ddtree_state.step
        if step is not None and step.accepted_nodes is not None:
            commit_accepted_rows(target_hidden_states, step.root_rows, step.accepted_nodes)
            commit_accepted_rows(target_positions, step.root_rows, step.accepted_nodes)
        super().propose(self.depth, target_token_ids, target_positions, target_hidden_states, next_token_ids,
                        token_indices_to_sample, common_attn_metadata, sampling_metadata, mm_embed_inputs,
                        num_rejected_tokens_gpu, slot_mappings)
        logits = self._draft_logits
        self._draft_logits = None
        num_reqs = next_token_ids.shape[0]
        tree = build_tree(logits.view(num_reqs, self.depth, -1), self.budget)
        self.ddtree_state.remember_trees(tree, self.ddtree_runner.input_batch.req_ids[:num_reqs])
        # Unused slots (fewer possible nodes than B) still need a valid token id for the target's
        # embedding; the verifier never accepts them (num_nodes bounds the tree).
        return tree.token_ids.clamp(min=0)

    def _sample_draft_tokens(self, hidden_states: torch.Tensor, sampling_metadata):
        if not self.ddtree:
            return super()._sample_draft_tokens(hidden_states, sampling_metadata)
        # DDTree needs the whole per-depth distribution, not a sample of it.
        self._draft_logits = self.model.compute_logits(hidden_states)
        return self._draft_logits.argmax(-1), None
