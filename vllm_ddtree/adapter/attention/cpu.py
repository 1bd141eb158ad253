"""Round step 3 on vLLM's CPU backend: its attention kernel cannot take a mask, so on a step that
verifies trees each target layer runs the dense-mask path over the same paged cache for the whole batch
(:func:`vllm_ddtree.tree_attention.tree_attention_dense`), with the gather indices and masks planned
once per step (:func:`plan`) for every layer. Steps without trees and the drafter's own non-causal
pass stay on vLLM's kernel.

It reads the cache in the layout of the layer's ISA, which vLLM picks as for any engine: ``vec`` and
``vec16`` (strided ``"cpu"`` views) and ``amx`` (bf16 on AMX machines, tile-packed: ``"cpu_amx"``).
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter.attention.layer_hook import call_output, tree_metadata, wrap_forward
from vllm_ddtree.adapter.support import refusal
from vllm_ddtree.tree_attention import TreeAttentionMetadata, plan_dense, tree_attention_dense

LAYOUT_OF_ISA = {"vec": "cpu", "vec16": "cpu", "amx": "cpu_amx"}


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


def warm_up(layer, budget: int, depth: int, dtype: torch.dtype) -> None:
    """Nothing to compile on CPU."""
