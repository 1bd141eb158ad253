"""Round step 3, *tree attention*: the target attends over the tree with an ancestor-only mask.

In:  queries ``[T, Hq, head_dim]`` of a mixed batch (prefill, decode and tree rows, flattened request
     by request), one layer's paged keys and values as ``[num_blocks, block_size, Hkv, head_dim]``
     views, and :class:`TreeAttentionMetadata` (built once per step, shared
     by every layer). The step's own K/V are already in the cache, as in vLLM.
     (:func:`vllm_ddtree.kv_commit.paged_kv_views` gives the views for vLLM's layouts.)
Out: ``[T, Hq, head_dim]`` attention outputs.

Which keys a query row sees: every key of its request's committed context (positions below
``seq_len - query_len``); then, for a tree request, the tree keys whose bit is set in the row's packed
ancestor row (the tree is the request's last ``tree_rows`` query rows, row 0 the root); for any other
row, the keys up to its own position (causal). A tree that is a chain gives exactly the causal result.

:func:`tree_attention` is the Triton kernel's launcher (one launch per layer, fixed shapes for a
fixed batch and B, so it can run inside a CUDA graph). :func:`tree_attention_reference` builds the
dense boolean mask from the block table and runs plain attention per request: the tests' oracle.
:func:`tree_attention_cpu` is the CPU path (vLLM's CPU attention cannot take a mask): a C++ kernel
(``kernels/cpu_tree_attention.cpp``, built on first use with torch's extension builder) that reads
vLLM's paged CPU cache in place. :func:`tree_attention_dense` is its fallback (no compiler, or a cache
layout the kernel does not read): the same dense masks, but requests of equal query length share one
masked SDPA call over a gathered copy of their context, and the gather indices and masks are planned
once per step (:func:`plan_dense`) for all layers. Both read lengths on the host.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from dataclasses import dataclass, field

import torch

from vllm_ddtree.tree import unpack_bits


@dataclass
class TreeAttentionMetadata:
    """Per-step structure of the batch, shared by every layer.

    ``query_start_loc [R+1]`` int32 (cumulative query rows), ``seq_lens [R]`` int32 (keys per request,
    this step's rows included), ``block_table [R, max_blocks]`` int32, ``tree_bits [R, N, W]`` int32
    (ancestor bits of each request's tree, ``N`` = B+1 rows; any content for causal requests) and
    ``tree_rows [R]`` int32 (rows under the tree mask: B+1 for a tree request, 0 for a causal one).
    ``dense_plan``: the CPU path's :func:`plan_dense`, made once per step for every layer (by the
    vLLM adapter before the step's forward; :func:`tree_attention_dense` plans itself without one).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    tree_bits: torch.Tensor
    tree_rows: torch.Tensor
    dense_plan: "DensePlan | None" = None


def tree_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   meta: TreeAttentionMetadata, scale: float, out: torch.Tensor | None = None,
                   block_q: int | None = None, block_n: int = 64, num_warps: int | None = None,
                   num_stages: int | None = None, num_splits: int | None = None,
                   multiprocessors: int | None = None) -> torch.Tensor:
    """Launches the Triton kernel: see the module docstring. ``block_n`` keys per inner iteration
    (a power of two >= 16; it may span several KV blocks); ``num_warps``/``num_stages`` default to
    Triton's. ``num_splits`` > 1 splits each tile's keys over that many programs and merges their
    partial outputs by log-sum-exp (split-K); by default :func:`choose_num_splits` picks it from the
    batch's shape (host values only, so the launch stays capturable) for ``multiprocessors`` (by
    default a CUDA device's own; off CUDA nothing is split unless it is given)."""
    import triton
    import triton.language as tl

    from vllm_ddtree.kernels.tree_attention import tree_attention_kernel

    T, num_heads, head_dim = query.shape
    num_blocks, page, kv_heads, _ = key_cache.shape
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {kv_heads} KV heads")
    if page < 16 or page & (page - 1):
        raise ValueError(f"KV block size {page} is not supported: use a power of two >= 16")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n {block_n} is not a power of two >= 16")
    if query.stride(2) != 1:
        raise ValueError("query needs a contiguous head dimension")
    group = num_heads // kv_heads
    if out is None:
        out = torch.empty_like(query)
    R = meta.seq_lens.shape[0]
    # Tiles of about 64 (query row, head) pairs: enough rows for tl.dot, few enough to keep a GQA-8
    # tree of 65 rows at 9 tiles rather than padding it to 128 rows.
    if block_q is None:
        block_q = max(1, 64 // group)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    compute = tl.float32 if interpreted or query.dtype == torch.float32 else (
        tl.bfloat16 if query.dtype == torch.bfloat16 else tl.float16)
    tiles = T // block_q + R
    if multiprocessors is None and query.is_cuda:
        multiprocessors = torch.cuda.get_device_properties(query.device).multi_processor_count
    if num_splits is None:
        num_splits = 1 if multiprocessors is None else choose_num_splits(
            tiles * kv_heads, meta.block_table.shape[1] * page, multiprocessors)
    if num_splits < 1:
        raise ValueError(f"num_splits {num_splits} must be >= 1")
    split = {}
    if num_splits > 1:
        partial = torch.empty(num_splits, T, num_heads, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(num_splits, T, num_heads, dtype=torch.float32, device=query.device)
        split = dict(partial_ptr=partial, lse_ptr=lse, split_stride=T * num_heads, NUM_SPLITS=num_splits)
    tree_attention_kernel[(tiles, kv_heads, num_splits)](
        out, query, key_cache, value_cache,
        meta.query_start_loc, meta.seq_lens, meta.block_table, meta.tree_bits, meta.tree_rows,
        scale, R,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *key_cache.stride(), *value_cache.stride(),
        meta.block_table.stride(0),
        TREE_ROWS=meta.tree_bits.shape[1], WORDS=meta.tree_bits.shape[2],
        GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim),
        BLOCK_Q=block_q, BLOCK_M=block_m, PAGE=page, BLOCK_N=block_n, COMPUTE_DTYPE=compute,
        **split, **{k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None},
    )
    if num_splits > 1:
        merge_splits(partial, lse, out)
    return out


# The split counts a launch may use: each is its own compiled kernel, all compiled at engine start
# (warm_up_tree_attention), so a live step never waits for a compile.
SPLIT_CHOICES = (1, 2, 4, 8, 16)


def choose_num_splits(programs: int, max_keys: int, sms: int) -> int:
    """Key splits (one of :data:`SPLIT_CHOICES`) for a GPU launch of ``programs`` (tile, KV head)
    programs whose requests hold at most ``max_keys`` keys (the block table's width: a shape, so no
    device value is read): the fewest that make the grid cover about two waves of ``sms``
    multiprocessors, keeping at least 256 keys a split. Not yet tuned on a GPU."""
    wanted = min(-(-2 * sms // max(programs, 1)), max_keys // 256)
    return next((n for n in SPLIT_CHOICES if n >= wanted), SPLIT_CHOICES[-1]) if wanted > 1 else 1


def uniform_tree_metadata(tree_bits: torch.Tensor, context: int, page: int, num_blocks: int) -> TreeAttentionMetadata:
    """A stand-in step of ``R = tree_bits.shape[0]`` tree requests of ``context`` keys each, whose
    trees are ``tree_bits`` (``[R, N, W]``, N rows each), on consecutive blocks (modulo
    ``num_blocks``): for warm-ups and cost measurements, not a live step."""
    R, N, _ = tree_bits.shape
    dev = tree_bits.device
    blocks_each = -(-(context + N) // page)
    return TreeAttentionMetadata(
        query_start_loc=(torch.arange(R + 1, device=dev) * N).to(torch.int32),
        seq_lens=torch.full((R,), context + N, dtype=torch.int32, device=dev),
        block_table=(torch.arange(R * blocks_each, device=dev) % num_blocks).view(R, -1).to(torch.int32),
        tree_bits=tree_bits, tree_rows=torch.full((R,), N, dtype=torch.int32, device=dev))


def warm_up_tree_attention(keys: torch.Tensor, values: torch.Tensor, num_heads: int, head_dim: int, scale: float,
                           budget: int, dtype: torch.dtype) -> tuple[int, ...]:
    """Launches the kernel once per split count on a one-request tree of ``budget`` + 1 rows over
    the given cache views (read only), with the constexprs of the engine's live tree steps, so that
    Triton compiles every variant before the first request. Returns the split counts launched."""
    rows = budget + 1
    bits = torch.zeros(1, rows, (rows + 31) // 32, dtype=torch.int32, device=keys.device)
    meta = uniform_tree_metadata(bits, context=0, page=keys.shape[1], num_blocks=keys.shape[0])
    query = torch.zeros(rows, num_heads, head_dim, dtype=dtype, device=keys.device)
    for splits in SPLIT_CHOICES:
        tree_attention(query, keys, values, meta, scale, num_splits=splits)
    return SPLIT_CHOICES


def merge_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t, h] = sum_s w[s] partial[s, t, h]`` with ``w = softmax_s(lse[s, t, h])``: the split
    outputs weighed by their share of the row's softmax mass (a row no split saw stays 0). One
    launch per layer (a chain of torch ops would be about eight)."""
    import triton

    from vllm_ddtree.kernels.tree_attention import merge_splits_kernel

    S, T, num_heads, head_dim = partial.shape
    splits_pad, head_pad = triton.next_power_of_2(S), triton.next_power_of_2(head_dim)
    # As many heads a program as keep its [splits, heads, head_dim] tile within 8192 values.
    block_h = min(triton.next_power_of_2(num_heads), max(1, 8192 // (splits_pad * head_pad)))
    merge_splits_kernel[(T, triton.cdiv(num_heads, block_h))](
        out, partial, lse, out.stride(0), out.stride(1), num_heads, T * num_heads,
        NUM_SPLITS=S, SPLITS_PAD=splits_pad, BLOCK_H=block_h, HEAD_DIM=head_dim, HEAD_PAD=head_pad)


def visibility_mask(meta: TreeAttentionMetadata, r: int) -> torch.Tensor:
    """Dense ``bool [query_len, seq_len]`` mask of request ``r`` (host-side, for the reference)."""
    q_len = int(meta.query_start_loc[r + 1] - meta.query_start_loc[r])
    seq_len = int(meta.seq_lens[r])
    context = seq_len - q_len
    dev = meta.seq_lens.device
    rows = torch.arange(q_len, device=dev).unsqueeze(1)
    keys = torch.arange(seq_len, device=dev).unsqueeze(0)
    mask = keys <= context + rows
    tree_rows = int(meta.tree_rows[r])
    if tree_rows:
        bits = unpack_bits(meta.tree_bits[r, :tree_rows], tree_rows)
        mask[q_len - tree_rows:, seq_len - tree_rows:] = bits
    return mask


def tree_attention_reference(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                             meta: TreeAttentionMetadata, scale: float,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention per request under the dense mask, in float32; same contract as the kernel."""
    T, num_heads, head_dim = query.shape
    page, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    if out is None:
        out = torch.empty_like(query)
    for r in range(meta.seq_lens.shape[0]):
        q0, q1 = int(meta.query_start_loc[r]), int(meta.query_start_loc[r + 1])
        if q1 == q0:
            continue
        seq_len = int(meta.seq_lens[r])
        positions = torch.arange(seq_len, device=query.device)
        blocks = meta.block_table[r, positions // page].long()
        keys = key_cache[blocks, positions % page].float().repeat_interleave(group, 1)  # [S, Hq, D]
        values = value_cache[blocks, positions % page].float().repeat_interleave(group, 1)
        q = query[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        scores = scores.masked_fill(~visibility_mask(meta, r), float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(out.dtype)
    return out


@dataclass
class DensePlan:
    """Per-step gather indices and masks of :func:`tree_attention_dense`: one group per query length.
    ``elements`` caches, per group and cache geometry, the flat indices of the group's keys and
    values (:func:`vllm_ddtree.kv_commit.token_elements`), for layouts whose views gather slowly."""

    groups: list  # (query rows [G, Q], key blocks [G, S], key offsets [G, S], mask [G, 1, Q, S])
    elements: dict = field(default_factory=dict)

    def token_elements(self, group: int, kv_cache: torch.Tensor, layout: str) -> torch.Tensor:
        from vllm_ddtree.kv_commit import token_elements

        key = (group, layout, tuple(kv_cache.shape), kv_cache.stride())
        if key not in self.elements:
            _, blocks, offsets, _ = self.groups[group]
            self.elements[key] = token_elements(kv_cache, layout, blocks, offsets)  # [G, S, 2, Hkv, D]
        return self.elements[key]


def plan_dense(meta: TreeAttentionMetadata, page: int) -> DensePlan:
    starts = meta.query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    dev = meta.seq_lens.device
    groups = []
    for q_len in sorted(set(q_lens) - {0}):
        reqs = torch.tensor([r for r, n in enumerate(q_lens) if n == q_len], device=dev)
        seq_lens = meta.seq_lens[reqs].long()
        S = int(seq_lens.max())
        rows = meta.query_start_loc[reqs].long().unsqueeze(1) + torch.arange(q_len, device=dev)  # [G, Q]
        keys = torch.arange(S, device=dev)
        blocks = meta.block_table[reqs][:, keys // page].long()  # [G, S]
        offsets = (keys % page).expand_as(blocks)
        # Causal against the request's own end (also hides the padding keys past its seq_len) ...
        i = torch.arange(q_len, device=dev).view(1, -1, 1)
        j = keys.view(1, 1, -1)
        context = (seq_lens - q_len).view(-1, 1, 1)
        mask = j <= context + i
        # ... except the tree block (its last tree_rows rows x keys), which takes the ancestor bits.
        tree_rows = meta.tree_rows[reqs].long().view(-1, 1, 1)
        ti = i - (q_len - tree_rows)
        tj = j - (seq_lens.view(-1, 1, 1) - tree_rows)
        in_tree = (ti >= 0) & (tj >= 0) & (tj < tree_rows)
        N = meta.tree_bits.shape[1]
        bits = unpack_bits(meta.tree_bits[reqs], N)  # [G, N, N]
        g = torch.arange(len(reqs), device=dev).view(-1, 1, 1)
        mask = torch.where(in_tree, bits[g, ti.clamp(0, N - 1), tj.clamp(0, N - 1)], mask)
        groups.append((rows, blocks, offsets, mask.unsqueeze(1)))
    return DensePlan(groups)


# Layouts whose tokens a flat gather by precomputed indices reads faster than the views' indexing
# (the AMX layout's views index six dimensions at once).
_GATHER_BY_ELEMENTS = ("cpu_amx",)


def tree_attention_dense(query: torch.Tensor, kv_cache: torch.Tensor, layout: str, meta: TreeAttentionMetadata,
                         scale: float, out: torch.Tensor | None = None, plan: DensePlan | None = None) -> torch.Tensor:
    """The kernel's contract on one layer's whole cache in ``layout`` (see
    :data:`vllm_ddtree.kv_commit.LAYOUTS`): masked SDPA batched over requests of equal query length,
    in the query's dtype (torch's CPU flash attention accumulates half-precision inputs in float32)."""
    import torch.nn.functional as F

    from vllm_ddtree.kv_commit import flat_cache, paged_kv_views

    if out is None:
        out = torch.empty_like(query)
    if plan is None:
        plan = plan_dense(meta, kv_cache.shape[2])
    for index, (rows, blocks, offsets, mask) in enumerate(plan.groups):
        q = query[rows].transpose(1, 2)  # [G, Hq, Q, D]
        if layout in _GATHER_BY_ELEMENTS:
            elements = plan.token_elements(index, kv_cache, layout)
            kv = torch.take(kv_cache, elements) if kv_cache.is_contiguous() else flat_cache(kv_cache)[elements]
            k, v = kv[:, :, 0], kv[:, :, 1]  # [G, S, Hkv, D]
        else:
            keys, values = paged_kv_views(kv_cache, layout)
            k, v = keys[blocks, offsets], values[blocks, offsets]
        o = F.scaled_dot_product_attention(q, k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = o.transpose(1, 2).to(out.dtype)
    return out


# The layouts the C++ kernel reads: per block and KV head, keys [head_dim, block_size] then values
# [block_size, head_dim] (vLLM's "vec" and "vec16" ISAs). The AMX layout keeps the dense path.
CPU_KERNEL_LAYOUTS = ("cpu",)
# The head sizes it is compiled for (one specialisation each: its loops over a head are unrolled).
CPU_KERNEL_HEAD_SIZES = (32, 64, 80, 96, 128, 256)
# VLLM_DDTREE_CPU_KERNEL=0 keeps the dense path (to compare the two, or to run without a compiler quietly).
CPU_KERNEL_ENV = "VLLM_DDTREE_CPU_KERNEL"


def cpu_kernel():
    """The C++ tree attention kernel's module, built once per machine (about 45 s, then cached by
    torch's extension builder in ``TORCH_EXTENSIONS_DIR``), or None where it cannot be built (no C++
    compiler) or :data:`CPU_KERNEL_ENV` is 0: callers then take :func:`tree_attention_dense`.
    Compiled for the host's own ISA."""
    if os.environ.get(CPU_KERNEL_ENV, "1") == "0":
        return None
    return _built_cpu_kernel()


@functools.cache
def _built_cpu_kernel():
    from torch.utils.cpp_extension import load

    import vllm_ddtree.kernels

    source = os.path.join(os.path.dirname(vllm_ddtree.kernels.__file__), "cpu_tree_attention.cpp")
    path = os.environ.get("PATH", "")
    try:
        if shutil.which("ninja") is None:  # the builder runs `ninja`: vLLM's own dependency, in its env's bin
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        # -fopenmp compiles at::parallel_for's OpenMP regions; the runtime is torch's own (already loaded).
        return load(name="vllm_ddtree_cpu_tree_attention", sources=[source],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"])
    except Exception as error:  # no compiler, or a build failure: the dense path still serves
        logging.getLogger(__name__).warning(
            "ddtree: the C++ tree attention kernel could not be built (%s); tree steps use the slower "
            "dense-mask path on vLLM's CPU backend (install a C++ compiler, e.g. g++, to get it)", error)
        return None
    finally:
        os.environ["PATH"] = path


def tree_attention_cpu(query: torch.Tensor, kv_cache: torch.Tensor, meta: TreeAttentionMetadata, scale: float,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's contract on one layer's whole cache in the ``"cpu"`` layout (see
    :data:`vllm_ddtree.kv_commit.LAYOUTS`), by the C++ kernel (:func:`cpu_kernel` must not be None):
    float32 accumulation, the output in the query's dtype."""
    if out is None:
        out = torch.empty_like(query)
    cpu_kernel().tree_attention_cpu(query, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_table,
                                    meta.tree_bits, meta.tree_rows, scale, out)
    return out
