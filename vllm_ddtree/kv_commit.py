"""Round step 5, *commit*: keep the accepted path's KV, contiguous after the committed prefix.

The target wrote the B+1 tree rows at sequential storage positions ``root + 0 .. root + B`` (row 0 is
the root, already committed). The scheduler then keeps the first ``k+1`` of them (k accepted nodes),
so the accepted path's rows ``root + a_1 .. root + a_k`` must be moved to ``root + 1 .. root + k``.

In:  per-layer paged caches (as token-major views, see :func:`paged_kv_views`), the block table
     ``[R, max_blocks]``, the root's storage position ``[R]`` and ``accepted_nodes [R, D+1]`` from
     :mod:`vllm_ddtree.verify` (root first, -1 after the path).
Out: the caches, changed in place. :func:`commit_accepted_rows` applies the same permutation to
     per-token rows (the hidden states the drafter reads next round).

The work is split as FlashInfer splits it: :func:`plan_commit` turns positions into (block, offset)
pairs once per step; :func:`commit_accepted_kv` only moves, for every layer. Moves whose node already
sits in its slot (a path that is a prefix of the flattened order, the common case) are masked off,
so a request whose path is contiguous costs nothing but the launch. Paths can overlap their own
destinations, so every source is read before any destination is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The layouts the commit can address; each names how a layer's cache tensor holds a token's K and V.
#   "flash_attn": [2, num_blocks, block_size, kv_heads, head_dim] (FlashAttention's classic layout)
#   "vllm":       [num_blocks, kv_heads, block_size, 2 * head_dim], the per-layer logical view vLLM
#                 0.32+ hands to its GPU backends, K and V side by side in the last dim (any strides)
#   "cpu":        the same shape, as vLLM's CPU backend fills its bytes (ISAs "vec" and "vec16"): per
#                 block and head, the keys transposed [head_dim, block_size], then the values
#                 [block_size, head_dim].
#   "cpu_amx":    the same shape, as its "amx" ISA (bf16 on AMX machines) packs them for the tile
#                 units: per block and head, keys [block_size/16, head_dim/2, 16 tokens, 2 dims], then
#                 values [head_dim/16, block_size/2, 16 dims, 2 tokens]. No strided view reaches a
#                 token there, so its views are :class:`PackedTokens` (indexing only, CPU only).
LAYOUTS = ("flash_attn", "vllm", "cpu", "cpu_amx")


def paged_kv_views(kv_cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's cache -> (keys, values), views ``[num_blocks, block_size, kv_heads, head_dim]``."""
    if layout == "flash_attn":
        return kv_cache[0], kv_cache[1]
    if layout == "vllm":
        head_dim = kv_cache.shape[-1] // 2
        view = kv_cache.transpose(1, 2)  # [blocks, block_size, heads, 2 * head_dim]
        return view[..., :head_dim], view[..., head_dim:]
    if layout == "cpu":
        blocks, heads, block_size, content = kv_cache.shape
        head_dim = content // 2
        keys = kv_cache.view(blocks, heads, 2, head_dim, block_size)[:, :, 0].permute(0, 3, 1, 2)
        values = kv_cache.view(blocks, heads, 2, block_size, head_dim)[:, :, 1].permute(0, 2, 1, 3)
        return keys, values
    if layout == "cpu_amx":
        return PackedTokens(kv_cache, keys=True), PackedTokens(kv_cache, keys=False)
    raise ValueError(f"unknown KV cache layout {layout!r}; known: {', '.join(LAYOUTS)}")


class PackedTokens:
    """Token-major access, as ``[num_blocks, block_size, kv_heads, head_dim]``, to the keys or the values
    of a ``"cpu_amx"`` cache (see :data:`LAYOUTS`): ``view[blocks, offsets]`` gathers whole tokens
    (index tensors of one shape S -> ``S + [kv_heads, head_dim]``) and ``view[blocks, offsets] = rows``
    writes them, which is all the dense tree attention and the KV commit do with a view."""

    TOKENS, PAIR = 16, 2  # the tile's 16 rows, and the bf16 pair packed in each 32-bit lane

    def __init__(self, kv_cache: torch.Tensor, keys: bool):
        blocks, heads, block_size, content = kv_cache.shape
        head_dim = content // 2
        half = kv_cache.view(blocks, heads, 2, block_size * head_dim)[:, :, 0 if keys else 1]
        if keys:  # [blocks, heads, block_size/16, head_dim/2, 16, 2]: token t, dims (2i, 2i+1)
            self.packed = half.view(blocks, heads, block_size // self.TOKENS, head_dim // 2, self.TOKENS, self.PAIR)
        else:  # [blocks, heads, head_dim/16, block_size/2, 16, 2]: tokens (2j, 2j+1), dim d
            self.packed = half.view(blocks, heads, head_dim // self.TOKENS, block_size // 2, self.TOKENS, self.PAIR)
        self.keys = keys
        self.shape = torch.Size((blocks, block_size, heads, head_dim))
        self.dtype, self.device, self.is_cuda = kv_cache.dtype, kv_cache.device, kv_cache.is_cuda

    def _index(self, blocks: torch.Tensor, offsets: torch.Tensor):
        colon = slice(None)
        if self.keys:
            return blocks, colon, offsets // self.TOKENS, colon, offsets % self.TOKENS, colon
        return blocks, colon, colon, offsets // self.PAIR, colon, offsets % self.PAIR

    def __getitem__(self, index) -> torch.Tensor:
        blocks, offsets = index
        return self.packed[self._index(blocks, offsets)].reshape(*blocks.shape, *self.shape[2:])

    def __setitem__(self, index, rows: torch.Tensor) -> None:
        blocks, offsets = index
        heads, head_dim = self.shape[2:]
        packed_rows = (heads, head_dim // 2, self.PAIR) if self.keys else (heads, head_dim // self.TOKENS, self.TOKENS)
        self.packed[self._index(blocks, offsets)] = rows.reshape(*blocks.shape, *packed_rows)

    def elements(self, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Storage indices of tokens ``(blocks, offsets)``: ``[..., kv_heads, head_dim]``."""
        stride, heads, head_dim = self.packed.stride(), *self.shape[2:]
        h = torch.arange(heads, device=blocks.device).unsqueeze(1) * stride[1]
        d = torch.arange(head_dim, device=blocks.device)
        if self.keys:
            token = offsets // self.TOKENS * stride[2] + offsets % self.TOKENS * stride[4]
            dim = d // self.PAIR * stride[3] + d % self.PAIR * stride[5]
        else:
            token = offsets // self.PAIR * stride[3] + offsets % self.PAIR * stride[5]
            dim = d // self.TOKENS * stride[2] + d % self.TOKENS * stride[4]
        return (self.packed.storage_offset() + blocks * stride[0] + token)[..., None, None] + h + dim


def token_elements(kv_cache: torch.Tensor, layout: str, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Indices into :func:`flat_cache` of the keys and values of tokens ``(blocks, offsets)``:
    ``[..., 2, kv_heads, head_dim]`` int64 (K then V). They depend only on the cache's shape and
    strides (computed on a ``meta`` stand-in), so one set serves every layer of that geometry."""
    geometry = torch.empty_strided(kv_cache.shape, kv_cache.stride(), dtype=kv_cache.dtype, device="meta")
    return torch.stack([_view_elements(view, blocks, offsets) for view in paged_kv_views(geometry, layout)], -3)


def flat_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """A 1-D view of every element a layer's cache spans, from its first one (any dense layout)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(kv_cache.shape, kv_cache.stride()))
    return kv_cache.as_strided((span,), (1,))


def _view_elements(view, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if isinstance(view, PackedTokens):
        return view.elements(blocks, offsets)
    stride, heads, head_dim = view.stride(), *view.shape[2:]
    h = torch.arange(heads, device=blocks.device).unsqueeze(1) * stride[2]
    d = torch.arange(head_dim, device=blocks.device) * stride[3]
    return (view.storage_offset() + blocks * stride[0] + offsets * stride[1])[..., None, None] + h + d


@dataclass
class CommitPlan:
    """Slot moves ``[R, D]``: node ``accepted_nodes[:, j]`` -> path slot j, for j = 1..D."""

    src_block: torch.Tensor
    src_offset: torch.Tensor
    dst_block: torch.Tensor
    dst_offset: torch.Tensor
    moves: torch.Tensor  # bool: this slot really moves


def plan_commit(block_table: torch.Tensor, block_size: int, root_positions: torch.Tensor,
                accepted_nodes: torch.Tensor) -> CommitPlan:
    """Positions -> (block, offset) pairs for every move of every request, on the device."""
    src, dst, moves = _path_moves(root_positions, accepted_nodes)
    table = block_table.to(torch.int64)
    return CommitPlan(table.gather(1, src // block_size), src % block_size,
                      table.gather(1, dst // block_size), dst % block_size, moves)


def commit_accepted_kv(token_views: list[torch.Tensor], plan: CommitPlan, use_triton: bool | None = None) -> None:
    """Applies ``plan`` in place to token-major views ``[num_blocks, block_size, ...]`` (every layer's
    keys and values, from :func:`paged_kv_views`).

    ``use_triton`` defaults to the Triton kernel on GPU tensors and the torch reference elsewhere.
    """
    for view in token_views:
        if use_triton if use_triton is not None else view.is_cuda:
            _commit_triton(view, plan)
        else:
            commit_accepted_kv_reference(view, plan)


def commit_accepted_tokens(kv_caches: list[torch.Tensor], layout: str, plan: CommitPlan) -> None:
    """:func:`commit_accepted_kv` on whole layer caches of one geometry, by flat indices computed once
    for all of them (keys and values of every move): two ops per layer, whatever the layout (the
    CPU path: its views cost a gather and a scatter each, the AMX one several)."""
    if not kv_caches:
        return
    src = token_elements(kv_caches[0], layout, plan.src_block, plan.src_offset).flatten()
    dst = token_elements(kv_caches[0], layout, plan.dst_block, plan.dst_offset).flatten()
    for cache in kv_caches:
        flat = flat_cache(cache)
        flat[dst] = flat[src]  # every source is read before any destination is written


def commit_accepted_kv_reference(view: torch.Tensor, plan: CommitPlan) -> None:
    """Torch reference: advanced-index gather of every source, then scatter (overlap-safe).

    Fixed shapes, no boolean masking: a non-move copies the root slot onto itself.
    """
    values = view[plan.src_block, plan.src_offset]
    view[plan.dst_block, plan.dst_offset] = values


def commit_accepted_rows(rows: torch.Tensor, root_rows: torch.Tensor, accepted_nodes: torch.Tensor) -> None:
    """The same permutation on per-token rows ``[T, ...]`` whose tree rows start at ``root_rows [R]``."""
    src, dst, _ = _path_moves(root_rows, accepted_nodes)
    # Non-moves copy the root row onto itself; the right-hand side is gathered before the write.
    rows[dst.flatten()] = rows[src.flatten()]


def _path_moves(root: torch.Tensor, accepted_nodes: torch.Tensor):
    """(source, destination, moves) ``[R, D]``: node a_j at ``root + a_j`` goes to ``root + j``.

    Non-moves (past the path, or a node already in its slot) point at the root, which never moves.
    """
    path = accepted_nodes[:, 1:]
    slot = torch.arange(1, path.shape[1] + 1, device=path.device)
    moves = (path >= 0) & (path != slot)
    root = root.to(torch.int64).unsqueeze(1)
    return root + torch.where(moves, path, 0), root + torch.where(moves, slot, 0), moves


def _commit_triton(view: torch.Tensor, plan: CommitPlan) -> None:
    import triton

    from vllm_ddtree.kernels.kv_commit import move_kv_slots_kernel

    inner_sizes, inner_strides = _coalesce(view.shape[2:], view.stride()[2:])
    if len(inner_sizes) > 2:
        raise ValueError(f"KV cache view with strides {view.stride()} cannot be addressed as [A, C]")
    while len(inner_sizes) < 2:
        inner_sizes, inner_strides = (1, *inner_sizes), (0, *inner_strides)
    (A, C), (stride_a, stride_c) = inner_sizes, inner_strides
    # Bits are moved, not numbers: an integer view of the same width avoids dtype handling (bf16, fp8).
    bits = view.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[view.element_size()])
    R, M = plan.moves.shape
    elems = A * C
    block_e = min(1024, max(16, triton.next_power_of_2(elems)))
    grid = (R, triton.cdiv(elems, block_e))
    move_kv_slots_kernel[grid](
        bits, plan.src_block, plan.src_offset, plan.dst_block, plan.dst_offset, plan.moves.to(torch.int8),
        view.stride(0), view.stride(1), stride_a, stride_c,
        C=C, ELEMS=elems, MAX_MOVES=M, MOVES_POW2=max(2, triton.next_power_of_2(M)), BLOCK_E=block_e,
    )


def _coalesce(sizes, strides):
    """Merges adjacent dims that are laid out as one (stride[i] == stride[i+1] * size[i+1])."""
    out_sizes, out_strides = [], []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out_sizes and out_strides[-1] == stride * size:
            out_sizes[-1] *= size
            out_strides[-1] = stride
        else:
            out_sizes.append(size)
            out_strides.append(stride)
    return tuple(out_sizes), tuple(out_strides)
