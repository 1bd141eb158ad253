"""Triton kernel of round step 3 (tree attention): ancestor-masked attention over a paged KV cache.

Launcher, metadata and torch reference: :mod:`vllm_ddtree.tree_attention`.

One launch serves a mixed batch. Every query row sees its request's committed context; a row of a
tree request then sees the tree keys whose bit is set in its packed ancestor row, any other row sees
the keys up to its own position (causal). Grid: (query tiles of all requests, KV heads[, key splits]);
a tile holds BLOCK_Q query rows of one request times the G query heads that share the KV head, so K
and V are read once per tile for the whole group. With NUM_SPLITS > 1 (split-K, flash-decoding style:
small batches leave most SMs idle otherwise) each program takes one range of the keys and stores a
normalized partial output and its log-sum-exp; the launcher merges the splits.
"""

import triton
import triton.language as tl


@triton.jit
def _request_of_tile(query_start_ptr, tile, num_requests, BLOCK_Q: tl.constexpr):
    # Request r's tiles start at query_start[r] // BLOCK_Q + r (each request rounds up to whole tiles);
    # the owner of `tile` is the last request starting at or before it.
    lo = 0
    hi = num_requests
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if start <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Triton specializes integer arguments on a GPU (a value of 1 becomes a constant, a multiple of 16 gets
# an alignment hint), each variant its own compile: the arguments that change from step to step (the
# batch's request count and row count) and the block table's width (the warm-up's stand-in table is
# narrower than the engine's) are left unspecialized, so that the engine-start warm-up compiles every
# variant a live step launches (tests/test_emulated_gpu.py checks the keys).
@triton.jit(do_not_specialize=["num_requests", "stride_bt", "split_stride"])
def tree_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr,
    query_start_ptr,   # [R + 1] int32: query rows of request r are query_start[r] .. query_start[r+1]-1
    seq_lens_ptr,      # [R] int32: keys of request r, this step's rows included
    block_table_ptr,   # [R, max_blocks] int32
    tree_bits_ptr,     # [R, TREE_ROWS, WORDS] int32 ancestor bits over the request's last query rows
    tree_rows_ptr,     # [R] int32: > 0 for a tree request (its rows use the bits), 0 = causal
    scale,
    num_requests,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_k_dim,
    stride_v_block, stride_v_slot, stride_v_head, stride_v_dim,
    stride_bt,
    TREE_ROWS: tl.constexpr, WORDS: tl.constexpr,
    GROUP: tl.constexpr,           # query heads per KV head
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = BLOCK_Q * GROUP rounded up to a power of 2
    PAGE: tl.constexpr,            # KV block size
    BLOCK_N: tl.constexpr,         # keys per iteration: a multiple of PAGE or a divisor of it
    COMPUTE_DTYPE: tl.constexpr,   # input dtype on GPU; float32 under the interpreter (its bf16 is wrong)
    partial_ptr=None,              # split-K: [NUM_SPLITS, T, Hq, HEAD_DIM] float32 normalized partial outputs
    lse_ptr=None,                  # split-K: [NUM_SPLITS, T, Hq] float32 log-sum-exp of each split's scores
    split_stride=0,                # split-K: T * Hq, one split's (row, head) pairs
    NUM_SPLITS: tl.constexpr = 1,  # > 1: program_id(2) takes one of NUM_SPLITS equal ranges of the keys
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _request_of_tile(query_start_ptr, tile, num_requests, BLOCK_Q)
    q_start = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_start
    local_tile = tile - (q_start // BLOCK_Q + req)
    if local_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len  # keys before this step's rows: visible to every row
    tree_rows = tl.load(tree_rows_ptr + req)

    m = tl.arange(0, BLOCK_M)
    row = local_tile * BLOCK_Q + m // GROUP  # query row within the request
    head = kv_head * GROUP + m % GROUP
    row_ok = (m < BLOCK_Q * GROUP) & (row < q_len)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + (q_start + row)[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(COMPUTE_DTYPE)

    # Tree rows are the request's last `tree_rows` query rows; their bits index keys from tree_base.
    tree_base = seq_len - tree_rows
    tree_row = row - (q_len - tree_rows)
    is_tree_row = row_ok & (tree_row >= 0)  # never for a causal request: tree_row < 0 there
    # The last key any row of the tile may see: causal rows stop at their own position.
    last_row = tl.minimum(local_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    if tree_rows > 0:
        key_end = seq_len
    else:
        key_end = context + last_row + 1

    key_lo = 0
    if NUM_SPLITS > 1:
        # Split s takes whole key tiles [s * per, (s + 1) * per) of this tile's keys; a split past the
        # last key stores an empty result (lse = -inf), which the merge weighs 0.
        per = tl.cdiv(tl.cdiv(key_end, BLOCK_N), NUM_SPLITS) * BLOCK_N
        key_lo = tl.program_id(2) * per
        key_end = tl.minimum(key_lo + per, key_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(key_lo, key_end, BLOCK_N):
        key = start + n
        key_ok = key < key_end
        # Each key's own page: an iteration may span several KV blocks, which need not be adjacent.
        block = tl.load(block_table_ptr + req * stride_bt + key // PAGE, mask=key_ok, other=0).to(tl.int64)
        slot = block * stride_k_block + (key % PAGE) * stride_k_slot
        k = tl.load(k_ptr + slot[None, :] + kv_head * stride_k_head + d[:, None] * stride_k_dim,
                    mask=key_ok[None, :] & d_ok[:, None], other=0.0).to(COMPUTE_DTYPE)
        s = tl.dot(q, k, out_dtype=tl.float32) * scale
        if start + BLOCK_N > context:  # only key tiles that hold this step's rows need the mask
            causal = key[None, :] <= (context + row)[:, None]
            bit_index = tl.maximum(key - tree_base, 0)
            in_tree = is_tree_row[:, None] & (key >= tree_base)[None, :]
            word = tl.load(tree_bits_ptr + (req * TREE_ROWS + tree_row)[:, None] * WORDS + (bit_index // 32)[None, :],
                           mask=in_tree & key_ok[None, :], other=0)
            ancestor = ((word >> (bit_index % 32)[None, :]) & 1) != 0
            visible = (key[None, :] < context) | tl.where(in_tree, ancestor, causal & (key[None, :] < tree_base))
            visible = visible & key_ok[None, :] & row_ok[:, None]
            s = tl.where(visible, s, float("-inf"))
        else:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen nothing yet keep m = -inf; shift by 0 then, so exp() stays finite.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_slot = block * stride_v_block + (key % PAGE) * stride_v_slot
        v = tl.load(v_ptr + v_slot[:, None] + kv_head * stride_v_head + d[None, :] * stride_v_dim,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(COMPUTE_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE_DTYPE), v, out_dtype=tl.float32)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS > 1:
        flat = tl.program_id(2) * split_stride + (q_start + row) * (tl.num_programs(1) * GROUP) + head
        tl.store(partial_ptr + flat[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + flat, lse, mask=row_ok)
    else:
        tl.store(out_ptr + (q_start + row)[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["split_stride"])  # the step's row count (see tree_attention_kernel)
def merge_splits_kernel(
    out_ptr, partial_ptr, lse_ptr,
    stride_o_tok, stride_o_head,
    num_heads, split_stride,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    # One program per (query row, block of BLOCK_H heads): the split outputs weighed by their share of
    # the row's softmax mass, exp(lse_s - max lse); a row no split saw (all -inf) stays 0.
    token = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    s_ok = (s < NUM_SPLITS)[:, None] & (h < num_heads)[None, :]
    flat = s[:, None] * split_stride + token * num_heads + h[None, :]  # [splits, heads]
    lse = tl.load(lse_ptr + flat, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top)[None, :])
    total = tl.sum(weight, 0)
    part = tl.load(partial_ptr + flat[:, :, None] * HEAD_DIM + d[None, None, :],
                   mask=s_ok[:, :, None] & (d < HEAD_DIM)[None, None, :], other=0.0)
    merged = tl.sum(part * weight[:, :, None], 0) / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + token * stride_o_tok + h[:, None] * stride_o_head + d[None, :],
             merged.to(out_ptr.dtype.element_ty), mask=(h < num_heads)[:, None] & (d < HEAD_DIM)[None, :])
