"""Round step 3 on vLLM's CPU backend: its attention kernel cannot take a mask, so on a step that
verifies trees each target layer runs ddtree's own over the same paged cache for the whole batch: the
C++ kernel that reads vLLM's cache in place (:func:`vllm_ddtree.tree_attention.tree_attention_cpu`,
the ``vec`` and ``vec16`` ISAs' layout), or, where it cannot serve (no C++ compiler to build it, the
AMX layout, a head size it is not built for), the dense-mask path
(:func:`vllm_ddtree.tree_attention.tree_attention_dense`) with its gather indices and masks planned
once per step (:func:`plan`) for every layer. Steps without trees and the drafter's own non-causal
pass stay on vLLM's kernel.

It reads the cache in the layout of the layer's ISA, which vLLM picks as for any engine: ``vec`` and
``vec16`` (strided ``"cpu"`` views) and ``amx`` (bf16 on AMX machines, tile-packed: ``"cpu_amx"``).

Beside this backend the rest of the step takes its host paths (the host is the device): the tree
build's host heap, the KV commit by flat indices, moving only what moves.
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter.attention.layer_hook import call_output, tree_metadata, wrap_forward
from vllm_ddtree.adapter.support import refusal
from vllm_ddtree.kv_commit import CommitPlan, commit_accepted_tokens
from vllm_ddtree.tree import build_tree
from vllm_ddtree.tree_attention import (CPU_KERNEL_HEAD_SIZES, CPU_KERNEL_LAYOUTS, TreeAttentionMetadata, cpu_kernel,
                                        plan_dense, tree_attention_cpu, tree_attention_dense,
                                        uniform_tree_metadata)

LAYOUT_OF_ISA = {"vec": "cpu", "vec16": "cpu", "amx": "cpu_amx"}

# The tree build's host heap (vllm_ddtree.tree.build_tree(builder="heap")): on a CPU it beats the
# torch beams at every batch measured, 45x at R = 1 and 1.3x at R = B = 64 (benchmarks/RESULTS.md).
TREE_BUILDER = "heap"

# Steps without drafts (a cost-aware engine decoding plainly) keep the drafter's context K/V: on a CPU
# one pass over the rows of 32 steps reads the drafter's projections (fc over the target's layers,
# K/V) once where 32 one-row passes read them 32 times: 1.4 ms a step, 2% of a plain step, on the
# real pair in float32 (benchmarks/RESULTS.md).
CONTEXT_WRITE_STEPS = 32

# vLLM's dummy attention metadata crashes vLLM 0.32's CPU attention kernel: step costs time dummy runs
# without attention and add the tree attention a step runs (extra_tree_attention).
DUMMY_RUN_ATTENTION = False


def serves(impl) -> bool:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    return isinstance(impl, CPUAttentionBackendImpl)


def cache_layout(name: str, layer) -> str:
    """The :data:`vllm_ddtree.kv_commit.LAYOUTS` entry of a CPU layer's cache; refuses other ISAs."""
    isa = getattr(layer, "isa", None)
    if isa not in LAYOUT_OF_ISA:
        raise refusal(f"vLLM's CPU attention ISA {isa!r} (target layer {name}; ddtree reads the caches of the "
                      f"{', '.join(LAYOUT_OF_ISA)} ISAs)")
    return LAYOUT_OF_ISA[isa]


def uses_kernel(layout: str, head_size: int, block_size: int) -> bool:
    """Whether tree steps take the C++ kernel for layers of this cache (else the dense path); builds
    the kernel on the first call of the process (about 45 s once per machine, then cached)."""
    return (layout in CPU_KERNEL_LAYOUTS and head_size in CPU_KERNEL_HEAD_SIZES and block_size % 16 == 0
            and cpu_kernel() is not None)


def hook(name: str, layer) -> None:
    """Gives one target layer the tree mask on tree steps (an instance attribute of its ``impl``)."""
    impl = layer.impl
    layout = cache_layout(name, layer)
    uses_kernel(layout, impl.head_size, layer.kv_cache.shape[2])  # builds it now, at engine start

    def tree_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        tree = tree_metadata(attn_metadata)
        output = call_output(args, kwargs)
        n = attn_metadata.num_actual_tokens
        attend(query[:n].view(n, impl.num_heads, impl.head_size), kv_cache, layout, tree, impl.scale,
               out=output[:n].view(n, impl.num_heads, impl.head_size))
        return output

    wrap_forward(impl, tree_forward)


def attend(query: torch.Tensor, kv_cache: torch.Tensor, layout: str, meta: TreeAttentionMetadata, scale: float,
           out: torch.Tensor) -> None:
    """One layer's tree attention, by the path :func:`plan` chose for the step."""
    if meta.dense_plan is None:
        tree_attention_cpu(query, kv_cache, meta, scale, out=out)
    else:
        tree_attention_dense(query, kv_cache, layout, meta, scale, out=out, plan=meta.dense_plan)


def plan(meta: TreeAttentionMetadata, target) -> None:
    """The step's plan, shared by every layer of ``target`` (:class:`~vllm_ddtree.adapter.state.TargetLayers`):
    the kernel's metadata as contiguous int32, or the dense path's gather indices and masks (host
    reads: on a CPU the host is the device)."""
    kv_cache = target.kv_caches[0]
    head_size = next(iter(target.layers.values())).impl.head_size
    if uses_kernel(target.kv_layout, head_size, kv_cache.shape[2]):
        for name in ("query_start_loc", "seq_lens", "block_table", "tree_bits", "tree_rows"):
            setattr(meta, name, getattr(meta, name).to(torch.int32).contiguous())
    else:
        meta.dense_plan = plan_dense(meta, kv_cache.shape[2])


def commit(kv_caches: list[torch.Tensor], layout: str, plan: CommitPlan) -> None:
    """The KV commit on the host: most paths are contiguous and move nothing (reading that costs
    nothing here); the others move by flat indices, two ops per layer."""
    if plan.moves.any():
        commit_accepted_tokens(kv_caches, layout, plan)


def extra_tree_attention(state, requests: int, context: int = 256) -> None:
    """What a tree step's rows cost on this backend beyond the dummy forward (step-cost timing, charged
    per row): every target layer attends to each tree request's context through the tree path a live
    step takes, with its plan (vLLM's own kernel serves other steps). One layer's cost, run once per
    layer, at a nominal context, with a random tree."""
    layer = next(iter(state.target.layers.values()))
    cache, impl, layout = layer.kv_cache, layer.impl, state.target.kv_layout
    N, page, dev = state.options.budget + 1, cache.shape[2], cache.device
    tree = build_tree(torch.randn(requests, state.options.depth, 64, device=dev), state.options.budget,
                      builder=TREE_BUILDER)
    meta = uniform_tree_metadata(tree.ancestor_bits, context, page, cache.shape[0])
    plan(meta, state.target)
    query = torch.randn(requests * N, impl.num_heads, impl.head_size, dtype=cache.dtype, device=dev)
    out = torch.empty_like(query)
    for _ in state.target.layers:
        attend(query, cache, layout, meta, impl.scale, out)


def warm_up(layer, budget: int, depth: int, dtype: torch.dtype) -> None:
    """Nothing to compile on CPU."""
