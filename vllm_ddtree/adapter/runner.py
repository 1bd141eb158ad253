"""Round steps 3-5 in vLLM's V1 model runner: tree positions and mask, tree verification, KV commit.

Hooks, applied to ``GPUModelRunner`` (``CPUModelRunner`` inherits them) and active only for a ddtree
config:

* ``__init__``: the chain rejection sampler is replaced by :class:`TreeVerifier`.
* ``_prepare_inputs``: after vLLM has laid out the step (sequential storage positions and slots), the
  tree rows' RoPE positions become ``root + depth`` in the runner's own positions buffer (the one the
  model reads, and the one a CUDA graph captures), and the step's tree attention metadata is published
  for the attention backend.

:class:`DDTreeState` carries a request's tree from the step that drafted it to the step that verifies
it (matched by request id: the batch can be reordered in between).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_ddtree.adapter.config import is_ddtree
from vllm_ddtree.kv_commit import commit_accepted_kv, paged_kv_views, plan_commit
from vllm_ddtree.tree import DraftTree, empty_tree
from vllm_ddtree.tree_attention import TreeAttentionMetadata
from vllm_ddtree.verify import TreeSampling, verify_tree

# The tree attention metadata of the target forward in flight, read by the attention backend hook.
# One engine step runs at a time per worker process.
ACTIVE_TREE_ATTENTION: list[TreeAttentionMetadata | None] = [None]
# Layers that applied the tree mask in the forward in flight: a backend without our hook would
# attend causally over the tree and verify garbage, so the verifier refuses a step where it is 0.
_TREE_ATTENTION_CALLS = [0]


def count_tree_attention_call() -> None:
    _TREE_ATTENTION_CALLS[0] += 1


@dataclass
class StepTrees:
    """The trees verified in this step, one per request of the batch (empty for non-tree requests)."""

    tree: DraftTree
    num_draft: torch.Tensor       # [R] draft tokens the scheduler kept for each request (0 = no tree)
    root_rows: torch.Tensor       # [R] row of each request's root in the step's flattened tokens
    root_positions: torch.Tensor  # [R] the root's position (storage and RoPE)
    attention: TreeAttentionMetadata
    accepted_nodes: torch.Tensor | None = None


class DDTreeState:
    def __init__(self):
        self.trees: DraftTree | None = None
        self.tree_req_ids: list[str] = []
        self.step: StepTrees | None = None

    @classmethod
    def of(cls, runner) -> "DDTreeState":
        if not hasattr(runner, "_ddtree_state"):
            runner._ddtree_state = cls()
        return runner._ddtree_state

    def remember_trees(self, tree: DraftTree, req_ids) -> None:
        self.trees, self.tree_req_ids = tree, list(req_ids)

    def trees_for(self, req_ids, num_draft: torch.Tensor, budget: int, depth: int) -> DraftTree:
        """The drafted trees of ``req_ids`` in batch order, cut to the drafts the scheduler kept."""
        R = len(req_ids)
        dev = num_draft.device
        index = {rid: i for i, rid in enumerate(self.tree_req_ids)}
        rows = [index.get(rid, -1) for rid in req_ids]  # host bookkeeping, like vLLM's own per step
        if self.trees is None:  # no step has drafted yet: nothing to verify
            return empty_tree(R, budget, dev, depth)
        rows_t = torch.tensor(rows, device=dev)
        have = rows_t >= 0
        rows_t = rows_t.clamp(min=0)
        t = self.trees
        num_nodes = torch.where(have, torch.minimum(t.num_nodes[rows_t], num_draft), 0)
        slot = torch.arange(budget, device=dev)
        used = slot.unsqueeze(0) < num_nodes.unsqueeze(1)
        return DraftTree(
            token_ids=torch.where(used, t.token_ids[rows_t], -1),
            parents=torch.where(used, t.parents[rows_t], 0),
            depths=torch.where(used, t.depths[rows_t], 1),
            scores=t.scores[rows_t],
            num_nodes=num_nodes,
            ancestor_bits=t.ancestor_bits[rows_t],
            max_depth=t.max_depth,
        )


def prepare_tree_step(runner, spec_decode_metadata) -> None:
    """After vLLM's ``_prepare_inputs``: RoPE positions of tree rows, and the step's tree metadata."""
    state = DDTreeState.of(runner)
    state.step = None
    ACTIVE_TREE_ATTENTION[0] = None  # a step without trees must never see last step's mask
    _TREE_ATTENTION_CALLS[0] = 0
    if spec_decode_metadata is None:
        return
    spec = runner.speculative_config
    num_reqs = runner.input_batch.num_reqs
    dev = runner.positions.device
    num_draft = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.int64, device=dev)
    tree = state.trees_for(runner.input_batch.req_ids[:num_reqs], num_draft, spec.ddtree_budget, spec.ddtree_depth)
    query_start = runner.query_start_loc.gpu[: num_reqs + 1].to(torch.int64)
    root_rows = query_start[1:] - (num_draft + 1)
    positions = runner.positions
    root_positions = positions[root_rows]
    B = tree.max_nodes
    node = torch.arange(1, B + 1, device=dev)
    in_tree = node.unsqueeze(0) <= num_draft.unsqueeze(1)
    rows = torch.where(in_tree, root_rows.unsqueeze(1) + node, root_rows.unsqueeze(1))
    values = torch.where(in_tree, root_positions.unsqueeze(1) + tree.depths, root_positions.unsqueeze(1))
    positions.scatter_(0, rows.flatten(), values.flatten())  # non-tree slots rewrite the root's own value
    attention = TreeAttentionMetadata(
        query_start_loc=query_start.to(torch.int32),
        seq_lens=runner.seq_lens[:num_reqs].to(torch.int32),
        block_table=runner.input_batch.block_table[0].get_device_tensor(num_reqs).to(torch.int32),
        tree_bits=tree.ancestor_bits,
        tree_rows=torch.where(num_draft > 0, num_draft + 1, 0).to(torch.int32),
    )
    state.step = StepTrees(tree, num_draft, root_rows, root_positions, attention)
    ACTIVE_TREE_ATTENTION[0] = attention


class TreeVerifier(torch.nn.Module):
    """Stands in for vLLM's ``RejectionSampler``: same call, same output format (-1 padded rows)."""

    def __init__(self, runner, chain_sampler):
        super().__init__()
        self.runner = runner
        self.chain_sampler = chain_sampler  # for vLLM's profiling dummy runs, which have no trees
        mode = chain_sampler.sampler.logprobs_mode
        if mode not in ("raw_logprobs", "raw_logits"):
            raise ValueError(f'speculative method ddtree returns logprobs in the raw modes only; logprobs_mode '
                             f'{mode!r} is not supported yet: use "raw_logprobs" (the default)')

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        from vllm.v1.outputs import SamplerOutput

        ACTIVE_TREE_ATTENTION[0] = None  # the target forward is over
        step = DDTreeState.of(self.runner).step
        if step is None:
            return self.chain_sampler(metadata, draft_probs, logits, sampling_metadata)
        _refuse_unsupported_sampling(sampling_metadata)
        if _TREE_ATTENTION_CALLS[0] == 0:
            raise RuntimeError("the target's attention backend did not apply ddtree's tree mask; ddtree hooks vLLM's "
                               "CPU, FLASH_ATTN and TRITON_ATTN backends: select one (--attention-backend)")
        tree = step.tree
        dev = logits.device
        num_draft = step.num_draft
        first = metadata.cu_num_sampled_tokens.to(dev, torch.int64) - (num_draft + 1)
        rows = first.unsqueeze(1) + torch.minimum(torch.arange(tree.max_nodes + 1, device=dev), num_draft.unsqueeze(1))
        verdict = verify_tree(tree, logits[rows], _tree_sampling(sampling_metadata, num_draft.shape[0], dev),
                              step.root_positions)
        step.accepted_nodes = verdict.accepted_nodes
        self._commit_kv(step, verdict.accepted_nodes)
        logprobs = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs = self._logprobs(logits, rows, verdict, sampling_metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=verdict.output_tokens.to(torch.int32), logprobs_tensors=logprobs)

    def _logprobs(self, logits, rows, verdict, max_num_logprobs):
        """Logprobs of each emitted token at the node the target sampled it from, in vLLM's layout:
        one row per output slot ``[R * (D+1)]``; slots past the path are dropped by vLLM's parser."""
        sampler = self.chain_sampler.sampler
        node_rows = rows.gather(1, verdict.accepted_nodes.clamp(min=0)).flatten()
        node_logits = logits[node_rows].float()
        values = node_logits if sampler.logprobs_mode == "raw_logits" else sampler.compute_logprobs(node_logits)
        return sampler.gather_logprobs(values, max_num_logprobs, verdict.output_tokens.flatten().clamp(min=0))

    def _commit_kv(self, step, accepted_nodes) -> None:
        caches = self.runner.kv_caches
        if not caches:
            return
        layout = "cpu" if caches[0].device.type == "cpu" else "vllm"
        block_size = caches[0].shape[2]
        plan = plan_commit(step.attention.block_table, block_size, step.root_positions, accepted_nodes)
        commit_accepted_kv([view for cache in caches for view in paged_kv_views(cache, layout)], plan)


def _tree_sampling(meta, num_reqs: int, device) -> TreeSampling:
    from vllm.utils.torch_utils import async_tensor_h2d

    zeros = torch.zeros(num_reqs, device=device)
    temperature = meta.temperature[:num_reqs].float() if meta.temperature is not None else zeros
    top_k = meta.top_k[:num_reqs].long() if meta.top_k is not None else zeros.long()
    top_p = meta.top_p[:num_reqs].float() if meta.top_p is not None else torch.ones_like(zeros)
    # Seeded requests keep their seed; the others draw fresh noise keys every step. vLLM keeps seeds
    # only in host-side generators, so they are gathered on the host and written in one async copy.
    seeds = torch.randint(0, 2**62, (num_reqs,), device=device)
    seeded = [(index, _as_int64(generator.initial_seed())) for index, generator in meta.generators.items()
              if index < num_reqs]
    if seeded:
        index, seed = async_tensor_h2d(seeded, device, torch.int64).T
        seeds[index] = seed
    # vLLM refuses min_p with any speculative method (SamplingParams._validate_spec_decode).
    return TreeSampling(temperature, top_k, top_p, torch.zeros_like(zeros), seeds, all_greedy=bool(meta.all_greedy),
                        all_random=bool(meta.all_random), truncated=meta.top_k is not None or meta.top_p is not None,
                        uses_min_p=False)


def _as_int64(seed: int) -> int:
    """torch keeps seeds as uint64 (a negative seed wraps): the same 64 bits, read as signed."""
    return seed - 2**64 if seed >= 2**63 else seed


def _refuse_unsupported_sampling(meta) -> None:
    if not meta.no_penalties or meta.allowed_token_ids_mask is not None or meta.bad_words_token_ids:
        raise NotImplementedError("ddtree does not apply presence/frequency/repetition penalties, allowed_token_ids "
                                  "or bad_words to tree nodes yet; drop them or use method 'dflash'")


def install(runner_cls) -> None:
    """Wraps the runner's ``__init__`` and ``_prepare_inputs``; a ddtree-less runner is untouched."""
    original_init = runner_cls.__init__
    original_prepare = runner_cls._prepare_inputs

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if is_ddtree(self.speculative_config):
            self.rejection_sampler = TreeVerifier(self, self.rejection_sampler)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = original_prepare(self, scheduler_output, num_scheduled_tokens)
        if is_ddtree(self.speculative_config):
            prepare_tree_step(self, out[1])
        return out

    runner_cls.__init__ = __init__
    runner_cls._prepare_inputs = _prepare_inputs
