"""Round step 3 on vLLM's CPU backend: its attention kernel cannot take a mask, so on a step that
verifies trees each target layer runs the dense-mask path over the same paged cache for the whole batch
(:func:`vllm_ddtree.tree_attention.tree_attention_dense`, planned by the step's first layer and
reused by the others). Steps without trees and the drafter's own non-causal pass stay on vLLM's kernel.

It reads the cache through the ``"cpu"`` views, which match the ``vec``/``vec16`` ISAs; for a ddtree
engine the ``amx`` ISA (bf16 on AMX machines, pair-packed) is therefore replaced by ``vec`` (the one
class-level hook here is on the metadata builder's ``__init__``: engine construction only).
"""

from __future__ import annotations

import functools

from vllm_ddtree.adapter.attention_hook import call_output, tree_metadata, wrap_forward
from vllm_ddtree.adapter.config import is_ddtree
from vllm_ddtree.kv_commit import paged_kv_views
from vllm_ddtree.tree_attention import plan_dense, tree_attention_dense

ADDRESSABLE_ISAS = ("vec", "vec16")


def serves(impl) -> bool:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    return isinstance(impl, CPUAttentionBackendImpl)


def hook(name: str, layer) -> None:
    """Gives one target layer the tree mask on tree steps (an instance attribute of its ``impl``)."""
    if getattr(layer, "isa", None) not in ADDRESSABLE_ISAS:
        raise ValueError(f"ddtree cannot read the CPU KV cache of layer {name} in ISA {getattr(layer, 'isa', None)!r}")
    impl = layer.impl

    def tree_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        tree = tree_metadata(attn_metadata)
        output = call_output(args, kwargs)
        n = attn_metadata.num_actual_tokens
        keys, values = paged_kv_views(kv_cache, "cpu")
        if tree.dense_plan is None:
            tree.dense_plan = plan_dense(tree, keys.shape[1])
        tree_attention_dense(query[:n].view(n, impl.num_heads, impl.head_size), keys, values, tree, impl.scale,
                             out=output[:n].view(n, impl.num_heads, impl.head_size), plan=tree.dense_plan)
        return output

    wrap_forward(impl, tree_forward)


def apply() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    original_init = CPUAttentionMetadataBuilder.__init__
    if getattr(original_init, "_ddtree_hook", False):
        return

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if is_ddtree(self.vllm_config.speculative_config) and self.isa not in ADDRESSABLE_ISAS:
            self.isa = "vec"
            self._set_isa_to_layers(self.layer_names)

    __init__._ddtree_hook = True
    CPUAttentionMetadataBuilder.__init__ = __init__
