"""Round step 3's layout in vLLM: where a step's tree rows sit, their positions, and the step's tree
attention metadata.

vLLM lays a step out as for a chain: each request's root (the last step's bonus token) and then its
scheduled drafts, at sequential storage positions and KV slots. :func:`prepare_tree_step`, run after
vLLM's own layout, takes the trees the drafter made last step, cut to what the scheduler kept
(:func:`trees_of_batch`), rewrites the tree rows' RoPE positions to ``root + depth`` in the runner's
positions buffer (the one the model reads and a CUDA graph captures; storage stays sequential), and
makes the step's :class:`~vllm_ddtree.tree_attention.TreeAttentionMetadata` (ancestor bits per
request). :func:`plan_attention` then makes the attention backend's plan for every layer, once.
After verification the drafter reads the same rows as a chain again: :func:`write_chain_positions`
gives them back their sequential positions.

Positions ``[T]`` int64; a request's rows are ``root_rows[r] + 0 .. num_draft[r]``.
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter.state import DDTreeState, DraftedTrees, StepTrees
from vllm_ddtree.tree import DraftTree, empty_tree
from vllm_ddtree.tree_attention import TreeAttentionMetadata


def write_tree_positions(positions: torch.Tensor, step: StepTrees, offsets: torch.Tensor) -> None:
    """``positions[root_row + j] = root_position + offsets[:, j - 1]`` for each request's tree rows
    ``j = 1..num_draft`` (in place; other rows keep their values)."""
    B = offsets.shape[1]
    node = torch.arange(1, B + 1, device=positions.device)
    in_tree = node.unsqueeze(0) <= step.num_draft.unsqueeze(1)
    root_rows, roots = step.root_rows.unsqueeze(1), step.root_positions.unsqueeze(1)
    rows = torch.where(in_tree, root_rows + node, root_rows)
    values = torch.where(in_tree, roots + offsets, roots)  # non-tree slots rewrite the root's own value
    positions.scatter_(0, rows.flatten(), values.flatten())


def write_chain_positions(positions: torch.Tensor, step: StepTrees) -> None:
    """The tree rows' sequential positions ``root + j`` back (what vLLM laid out before the tree)."""
    chain = torch.arange(1, step.tree.max_nodes + 1, device=step.num_draft.device).expand_as(step.tree.depths)
    write_tree_positions(positions, step, chain)


def prepare_tree_step(state: DDTreeState, num_draft: torch.Tensor | None, req_ids: list[str],
                      positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_table: torch.Tensor, num_reqs: int) -> None:
    """After vLLM laid the step out: the tree rows' RoPE positions, ``state.step`` and the step's tree
    metadata (``state.pending_attention``), for the batch's first ``num_reqs`` requests
    (``num_draft [R]``: the drafts the scheduler kept for each, None when it kept none for any, a
    host fact; ``query_start_loc [R+1]``, ``seq_lens [R]``, ``block_table [R, max_blocks]``, on the
    device). A step with no drafts leaves ``state.step`` None: vLLM's attention and sampler serve it."""
    drafted = state.take_drafted()
    state.step = state.pending_attention = None
    if state.options.policy == "cost-aware":
        # Whether the last full drafter pass kept a node for any request: the schedule, a host list
        # every rank gets alike, says so (no device value is read).
        state.schedule.after_schedule(num_draft is None, lambda: affordable_probe_interval(state, num_reqs))
    if num_draft is None:
        return
    num_draft = num_draft.to(torch.int64)
    tree = trees_of_batch(drafted, req_ids[:num_reqs], num_draft, state.options.budget, state.options.depth)
    query_start = query_start_loc[: num_reqs + 1].to(torch.int64)
    root_rows = query_start[1:] - (num_draft + 1)
    attention = TreeAttentionMetadata(
        query_start_loc=query_start.to(torch.int32),
        seq_lens=seq_lens[:num_reqs].to(torch.int32),
        block_table=block_table.to(torch.int32),
        tree_bits=tree.ancestor_bits,
        tree_rows=torch.where(num_draft > 0, num_draft + 1, 0).to(torch.int32),
    )
    state.step = StepTrees(tree, num_draft, root_rows, positions[root_rows], attention)
    write_tree_positions(positions, state.step, tree.depths)
    state.pending_attention = attention


def attach_tree_metadata(state: DDTreeState, attn_metadata: dict) -> None:
    """The step's tree metadata onto the target layers' attention metadata (vLLM's ``layer name ->
    metadata``), where the attention hooks read it; once: a later build in the same step (a dummy
    run of vLLM's) gets none."""
    from vllm_ddtree.adapter.attention.layer_hook import TREE_METADATA

    tree, state.pending_attention = state.pending_attention, None
    if tree is not None:
        for name in state.target.layers:
            setattr(attn_metadata[name], TREE_METADATA, tree)


def plan_attention(state: DDTreeState) -> None:
    """The attention backend's plan of the step's tree metadata, for every target layer, once."""
    if state.pending_attention is not None:
        state.target.backend.plan(state.pending_attention, state.target)


def affordable_probe_interval(state: DDTreeState, num_reqs: int, share: float = 0.01) -> int:
    """Steps between probes so that probing (a full drafter pass) costs at most ``share`` of plain
    decoding at this batch size: at large batches a drafter pass costs many plain steps. Host tables.
    1%: an engine decoding plainly should cost at most 2% over one without speculation, and the
    drafter's context writes and vLLM's speculative bookkeeping take the other half."""
    costs = state.costs_host
    requests = min(num_reqs, costs.draft.shape[0] - 1)
    plain = float(costs.step[min(requests, costs.step.shape[0] - 1)])
    return int(min(1024, float(costs.draft[requests]) / max(plain, 1e-9) / share))


def trees_of_batch(drafted: DraftedTrees | None, req_ids, num_draft: torch.Tensor, budget: int,
                   depth: int) -> DraftTree:
    """The drafted trees of ``req_ids`` in batch order, cut to the drafts the scheduler kept.

    The trees are in the rows of the batch that drafted them. In a steady batch the rows are the same
    (one list comparison, no upload); after vLLM added, removed or moved requests, each request's row
    is looked up by id on the host, as vLLM's own runner maps its previous step's rows
    (``_compute_prev_positions``), and goes down in one pinned non-blocking copy.
    """
    from vllm.utils.torch_utils import async_tensor_h2d

    R = len(req_ids)
    dev = num_draft.device
    if drafted is None:  # the drafter did not run last step: nothing to verify
        return empty_tree(R, budget, dev, depth)
    trees = drafted.tree
    if list(req_ids) == drafted.req_ids:
        return trees.cut(torch.minimum(trees.num_nodes, num_draft))
    index = {rid: i for i, rid in enumerate(drafted.req_ids)}
    rows = async_tensor_h2d([index.get(rid, -1) for rid in req_ids], dev, torch.int64)
    mine = trees.take(rows.clamp(min=0))
    return mine.cut(torch.where(rows >= 0, torch.minimum(mine.num_nodes, num_draft), 0))
