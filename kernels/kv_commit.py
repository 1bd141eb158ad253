"""Triton kernel of round step 5 (commit): move the accepted path's KV slots into place.

Launcher and torch reference: :mod:`vllm_ddtree.kv_commit`.
"""

import triton
import triton.language as tl


@triton.jit
def move_kv_slots_kernel(
    cache_ptr,            # one layer's paged cache, viewed token-major: [blocks, block_size, A, C]
    src_block_ptr, src_offset_ptr, dst_block_ptr, dst_offset_ptr,  # [R, MAX_MOVES] int64
    move_ptr,             # [R, MAX_MOVES] int8: 1 where the slot really moves
    stride_block, stride_offset, stride_a, stride_c,
    C: tl.constexpr,      # inner extent; the program's chunk covers flat elements e = a * C + c
    ELEMS,                # A * C
    MAX_MOVES: tl.constexpr,
    MOVES_POW2: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # One program per (request, chunk of the token's elements). Paths can overlap their own
    # destinations (node 5 -> slot 2 while node 2 -> slot 1), so every source of the chunk is
    # loaded before any destination is stored; other requests own other slots.
    req = tl.program_id(0)
    chunk = tl.program_id(1)
    m = tl.arange(0, MOVES_POW2)
    in_range = m < MAX_MOVES
    row = req * MAX_MOVES + m
    moving = (tl.load(move_ptr + row, mask=in_range, other=0) != 0) & in_range
    src = (tl.load(src_block_ptr + row, mask=moving, other=0) * stride_block
           + tl.load(src_offset_ptr + row, mask=moving, other=0) * stride_offset)
    dst = (tl.load(dst_block_ptr + row, mask=moving, other=0) * stride_block
           + tl.load(dst_offset_ptr + row, mask=moving, other=0) * stride_offset)
    e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
    inner = (e // C) * stride_a + (e % C) * stride_c
    mask = moving[:, None] & (e < ELEMS)[None, :]
    values = tl.load(cache_ptr + src[:, None] + inner[None, :], mask=mask)
    # Threads of the program hold different elements; a thread must not overwrite a source that
    # another thread has yet to read.
    tl.debug_barrier()
    tl.store(cache_ptr + dst[:, None] + inner[None, :], values, mask=mask)
