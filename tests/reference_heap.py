"""A plain-Python port of the DDTree reference's best-first heap (liranringel/ddtree, build_ddtree_tree).

The reference is the oracle for :func:`vllm_ddtree.tree.build_tree`: one request at a time, a real
``heapq``, keyed ``(-score, rank tuple)`` exactly as the reference keys it. Two documented changes: a
node of score ``-inf`` (drafter probability 0) ends the selection instead of filling the budget
(vllm_ddtree.tree explains why), and a node's score is ``parent score + logp`` in float32 (the reference's sibling update
``w - lp[r] + lp[r+1]`` is the same sum rewritten, but NaN when ``lp[r]`` is ``-inf`` and rounded
differently), so both sides define equal scores the same way.
"""

from __future__ import annotations

import heapq

import numpy as np


def reference_tree(top_logp: np.ndarray, top_tokens: np.ndarray, budget: int):
    """``top_logp``/``top_tokens`` ``[D, K]`` (sorted per depth) -> list of nodes in pop order.

    Each node is ``(token_path, parent_index, depth, score)``; parent index 0 is the root, nodes are
    numbered from 1 in pop order, as in the reference.
    """
    D, K = top_logp.shape
    k = min(budget, K)  # the reference takes top-min(budget, V) per depth
    if budget <= 0 or D == 0 or k == 0:
        return []
    lp = top_logp.astype(np.float32)
    first = np.float32(0.0) + lp[0, 0]
    heap = [(-float(first), (0,), 0, 1, 0, first)]
    nodes = []
    paths = {0: ()}
    while heap and len(nodes) < budget:
        _, ranks, parent, depth, rank, score = heapq.heappop(heap)
        if score == -np.inf:  # our one deliberate change: probability-0 nodes are never drafted
            break
        index = len(nodes) + 1
        path = paths[parent] + (int(top_tokens[depth - 1, rank]),)
        paths[index] = path
        nodes.append((path, parent, depth, float(score)))
        if rank + 1 < k:
            sib = _parent_score(nodes, parent) + lp[depth - 1, rank + 1]
            heapq.heappush(heap, (-float(sib), ranks[:-1] + (rank + 1,), parent, depth, rank + 1, sib))
        if depth < D:
            child = score + lp[depth, 0]
            heapq.heappush(heap, (-float(child), ranks + (0,), index, depth + 1, 0, child))
    return nodes


def _parent_score(nodes, parent: int) -> np.float32:
    return np.float32(0.0) if parent == 0 else np.float32(nodes[parent - 1][3])
