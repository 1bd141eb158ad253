"""Triton kernel of round step 2 (tree): the best-first node selection in one launch.

Launcher and the torch implementation it must equal node for node: :mod:`vllm_ddtree.tree`.

One program per request walks the DDTree heap itself, B pops, with the heap held as a frontier over
the nodes popped so far: a popped node (or the root) has exactly one pending child, its next-ranked
token one depth down (children are pushed one rank at a time, a sibling only when its predecessor
pops). So the frontier is one candidate score per node, ``cand [NODES]``, and a pop is an argmax over
it. Ties need the reference's order, the candidates' rank tuples compared lexicographically; for two
pending children that is the post-order of their parents in the popped tree (a descendant's pending
child precedes its ancestor's, whose next rank is past the descendant's branch; unrelated nodes
compare as their paths do). ``post`` keeps that order: a new node takes its parent's place in it,
right before the parent, and everything from the parent on moves one up.

Per pop: a handful of reductions over NODES registers, two scalar loads of log-probs, and one
ancestor row (the parent's row plus the node's own bit) copied in global memory, where rows of large
budgets would not fit in registers.
"""

import triton
import triton.language as tl


@triton.jit
def tree_build_kernel(
    logp_ptr,        # [R, D, K] float32, each depth's top-K log-probs in descending order
    tokens_ptr,      # [R, D, K] int64, their tokens
    budget_ptr,      # [R] int64 in 0..B
    token_ids_ptr,   # out [R, B] int64
    parents_ptr,     # out [R, B] int64
    depths_ptr,      # out [R, B] int64
    scores_ptr,      # out [R, B] float32
    num_nodes_ptr,   # out [R] int64
    bits_ptr,        # out [R, B + 1, WORDS] int32
    D, K,
    B: tl.constexpr,
    NODES: tl.constexpr,      # power of 2 >= B + 1: node 0 is the root, nodes 1..B in pop order
    WORDS: tl.constexpr,      # ceil((B + 1) / 32)
    WORDS_PAD: tl.constexpr,  # power of 2 >= WORDS
    ROW_CHUNK: tl.constexpr,  # ancestor rows initialised per store
):
    r = tl.program_id(0).to(tl.int64)
    NEG = float("-inf")
    node = tl.arange(0, NODES)
    word = tl.arange(0, WORDS_PAD)
    in_row = word < WORDS
    lp = logp_ptr + r * D * K
    row_bits = bits_ptr + r * (B + 1) * WORDS

    # Every row starts as "itself and the root": what an unused slot keeps (parent 0).
    for start in range(0, B + 1, ROW_CHUNK):
        rows = start + tl.arange(0, ROW_CHUNK)
        own = tl.where(word[None, :] == rows[:, None] // 32, tl.full([1, 1], 1, tl.int32) << (rows[:, None] % 32), 0)
        own = own | tl.where(word[None, :] == 0, 1, 0)
        tl.store(row_bits + rows[:, None] * WORDS + word[None, :], own, mask=(rows[:, None] <= B) & in_row[None, :])
    tl.debug_barrier()

    budget = tl.load(budget_ptr + r)
    score = tl.zeros([NODES], tl.float32)    # path log-prob (root: 0)
    depth = tl.zeros([NODES], tl.int32)      # root: 0
    rank = tl.zeros([NODES], tl.int32)       # rank of the node's token among its depth's top-K
    parent = tl.zeros([NODES], tl.int32)
    next_rank = tl.zeros([NODES], tl.int32)  # rank of the node's pending child
    post = tl.zeros([NODES], tl.int32)       # tie order of the pending children (smaller pops first)
    # + 0.0: a -0.0 log-prob scores as 0, as in the torch build.
    cand = tl.where(node == 0, tl.load(lp) + 0.0, NEG)
    count = 0
    for i in range(B):
        best = tl.max(cand, 0)
        active = (i < budget) & (best > NEG)  # a -inf best: nothing the drafter allows is left
        tied = cand == best
        q_post = tl.min(tl.where(tied, post, NODES), 0)
        is_q = tied & (post == q_post)
        q = tl.sum(tl.where(is_q, node, 0), 0)
        q_score = tl.sum(tl.where(is_q, score, 0.0), 0)
        q_depth = tl.sum(tl.where(is_q, depth, 0), 0)
        q_next = tl.sum(tl.where(is_q, next_rank, 0), 0)
        n = i + 1
        is_n = (node == n) & active
        # The popped node's next sibling is its parent's new pending child; the node's own first child
        # is its pending child.
        sibling = q_score + tl.load(lp + q_depth * K + q_next + 1, mask=active & (q_next + 1 < K), other=NEG)
        child = best + tl.load(lp + (q_depth + 1) * K, mask=active & (q_depth + 1 < D), other=NEG)
        update_q = is_q & active
        cand = tl.where(update_q, sibling, tl.where(is_n, child, cand))
        next_rank = tl.where(update_q, q_next + 1, next_rank)
        score = tl.where(is_n, best, score)
        depth = tl.where(is_n, q_depth + 1, depth)
        rank = tl.where(is_n, q_next, rank)
        parent = tl.where(is_n, q, parent)
        post = tl.where(active & (post >= q_post), post + 1, post)
        post = tl.where(is_n, q_post, post)
        # (the scalar `active` widened by an add: the interpreter's loads reject broadcast views)
        row_mask = in_row & (tl.zeros([WORDS_PAD], tl.int32) + active.to(tl.int32) != 0)
        q_row = tl.load(row_bits + q * WORDS + word, mask=row_mask, other=0)
        n_row = q_row | tl.where(word == n // 32, tl.full([WORDS_PAD], 1, tl.int32) << (n % 32), 0)
        tl.store(row_bits + n * WORDS + word, n_row, mask=row_mask)
        tl.debug_barrier()  # row n is read back by its children's pops, possibly from other threads
        count += active.to(tl.int32)

    # Node n goes to slot n - 1; unused slots: token -1, parent 0, depth 1, score -inf.
    slot_mask = (node >= 1) & (node <= B)
    used = slot_mask & (node <= count)
    out = r * B + node - 1
    token = tl.load(tokens_ptr + r * D * K + (depth - 1) * K + rank, mask=used, other=-1)
    tl.store(token_ids_ptr + out, token, mask=slot_mask)
    tl.store(parents_ptr + out, tl.where(used, parent, 0), mask=slot_mask)
    tl.store(depths_ptr + out, tl.where(used, depth, 1), mask=slot_mask)
    tl.store(scores_ptr + out, tl.where(used, score, NEG), mask=slot_mask)
    tl.store(num_nodes_ptr + r, count)
