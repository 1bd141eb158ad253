"""Round step 3 on vLLM's CPU backend: its attention kernel cannot take a mask, so on a step that
verifies trees each target layer runs the dense-mask path over the same paged cache for the whole batch
(:func:`vllm_ddtree.tree_attention.tree_attention_dense`), with the gather indices and masks planned
once per step (:func:`plan`) for every layer. Steps without trees and the drafter's own non-causal
pass stay on vLLM's kernel.

It reads the cache in the layout of the layer's ISA, which vLLM picks as for any engine: ``vec`` and
``vec16`` (strided ``"cpu"`` views) and ``amx`` (bf16 on AMX machines, tile-packed: ``"cpu_amx"``).

Beside this backend the rest of the step takes its host paths (the host is the device): the tree
build's batched torch selection, the KV commit by flat indices, moving only what moves.
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter.attention.layer_hook import call_output, tree_metadata, wrap_forward
from vllm_ddtree.adapter.support import refusal
from vllm_ddtree.kv_commit import CommitPlan, commit_accepted_tokens
from vllm_ddtree.tree import build_tree
from vllm_ddtree.tree_attention import (TreeAttentionMetadata, plan_dense, tree_attention_dense,
                                        uniform_tree_metadata)

LAYOUT_OF_ISA = {"vec": "cpu", "vec16": "cpu", "amx": "cpu_amx"}

# The tree build's torch selection (vllm_ddtree.tree.build_tree(fused=False)).
FUSED_TREE_BUILD = False

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


def hook(name: str, layer) -> None:
    """Gives one target layer the tree mask on tree steps (an instance attribute of its ``impl``)."""
    impl = layer.impl
    layout = cache_layout(name, layer)

    def tree_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        tree = tree_metadata(attn_metadata)
        output = call_output(args, kwargs)
        n = attn_metadata.num_actual_tokens
        tree_attention_dense(query[:n].view(n, impl.num_heads, impl.head_size), kv_cache, layout, tree, impl.scale,
                             out=output[:n].view(n, impl.num_heads, impl.head_size), plan=tree.dense_plan)
        return output

    wrap_forward(impl, tree_forward)


def plan(meta: TreeAttentionMetadata, kv_cache: torch.Tensor) -> None:
    """The dense path's gather indices and masks for the step, shared by every layer (host reads:
    on a CPU the host is the device)."""
    meta.dense_plan = plan_dense(meta, kv_cache.shape[2])


def commit(kv_caches: list[torch.Tensor], layout: str, plan: CommitPlan) -> None:
    """The KV commit on the host: most paths are contiguous and move nothing (reading that costs
    nothing here); the others move by flat indices, two ops per layer."""
    if plan.moves.any():
        commit_accepted_tokens(kv_caches, layout, plan)


def extra_tree_attention(state, requests: int, context: int = 256) -> None:
    """What a tree step costs on this backend beyond its rows (step-cost timing): every target layer
    attends to each tree request's context through the dense-mask path (vLLM's own kernel serves
    other steps). One layer's cost, run once per layer, at a nominal context, with a random tree."""
    layer = next(iter(state.target.layers.values()))
    cache, impl, layout = layer.kv_cache, layer.impl, state.target.kv_layout
    N, page, dev = state.options.budget + 1, cache.shape[2], cache.device
    tree = build_tree(torch.randn(requests, state.options.depth, 64, device=dev), state.options.budget, fused=False)
    meta = uniform_tree_metadata(tree.ancestor_bits, context, page, cache.shape[0])
    query = torch.randn(requests * N, impl.num_heads, impl.head_size, dtype=cache.dtype, device=dev)
    plan = plan_dense(meta, page)
    for _ in state.target.layers:
        tree_attention_dense(query, cache, layout, meta, impl.scale, plan=plan)


def warm_up(layer, budget: int, depth: int, dtype: torch.dtype) -> None:
    """Nothing to compile on CPU."""
