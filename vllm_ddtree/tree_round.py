"""One DDTree round, whole: the algorithm in one function, before any engine.

    draft logits [R, D, V]
      -> 2. tree:    the B best nodes of the best-first heap (:func:`vllm_ddtree.tree.build_tree`)
      -> 3. target:  the target's forward over ``[root, nodes...]`` per request, RoPE positions
                     ``root + depth``, attention under the ancestor mask
                     (:mod:`vllm_ddtree.tree_attention`); the caller's model, so a callable here
      -> 4. verify:  one target token per node from its processed distribution, the walk from the root
                     (:func:`vllm_ddtree.verify.verify_tree`)
      -> 5. commit:  the accepted path's KV moved behind the committed prefix
                     (:mod:`vllm_ddtree.kv_commit`)

Step 1, the drafter's pass, yields ``draft_logits``. The toy generation loop
(:mod:`vllm_ddtree.tools.toy`) and the whole-step benchmark (``benchmarks/bench_step.py``) run their
rounds through here; the vLLM adapter runs the same steps spread over vLLM's engine step
(:mod:`vllm_ddtree.adapter`). Everything is fixed-shape device work: no host read, no per-request loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vllm_ddtree.kv_commit import commit_accepted_kv, plan_commit
from vllm_ddtree.tree import DraftTree, build_tree
from vllm_ddtree.verify import TreeSampling, TreeVerdict, verify_tree


@dataclass
class PagedKV:
    """The target's paged caches as the commit moves them: every layer's key and value views
    ``[num_blocks, block_size, kv_heads, head_dim]`` (:func:`vllm_ddtree.kv_commit.paged_kv_views`) and
    the requests' block table ``[R, max_blocks]``."""

    views: list[torch.Tensor]
    block_table: torch.Tensor


def tree_round(draft_logits: torch.Tensor, budget: int, target: Callable[[DraftTree], torch.Tensor],
               sampling: TreeSampling, root_positions: torch.Tensor, *, row_starts: torch.Tensor | None = None,
               kv: PagedKV | None = None) -> tuple[DraftTree, TreeVerdict]:
    """One round for R requests whose committed prefixes end with their roots at ``root_positions [R]``.

    ``target(tree)`` is the target's forward over the tree (step 3): its logits ``[R, B+1, V]``, or flat
    ``[T, V]`` with request r's root at row ``row_starts[r]``. ``kv``: the caches to commit into (the
    target wrote the tree rows at storage positions ``root + 0 .. root + B``); None to skip the commit.
    """
    tree = build_tree(draft_logits, budget)
    logits = target(tree)
    return tree, verify_and_commit(tree, logits, sampling, root_positions, row_starts=row_starts, kv=kv)


def verify_and_commit(tree: DraftTree, logits: torch.Tensor, sampling: TreeSampling, root_positions: torch.Tensor, *,
                      row_starts: torch.Tensor | None = None, kv: PagedKV | None = None) -> TreeVerdict:
    """Steps 4 and 5 of :func:`tree_round`, for a caller that runs the target's forward itself (in
    pieces, between CUDA graphs)."""
    verdict = verify_tree(tree, logits, sampling, root_positions, row_starts=row_starts)
    if kv is not None:
        page = kv.views[0].shape[1]
        commit_accepted_kv(kv.views, plan_commit(kv.block_table, page, root_positions, verdict.accepted_nodes))
    return verdict
