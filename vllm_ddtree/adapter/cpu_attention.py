"""Round step 3 on vLLM's CPU backend: its attention kernel cannot take a mask, so target forwards of
a tree step run the dense-mask reference (:func:`vllm_ddtree.tree_attention.tree_attention_reference`)
over the same paged cache. Everything else (prefill, the drafter's own non-causal pass, steps without
trees) stays on vLLM's kernel.

The reference reads the cache through the ``"cpu"`` views, which match the ``vec``/``vec16`` ISAs; for
a ddtree engine the ``amx`` ISA (bf16 on AMX machines, pair-packed) is therefore replaced by ``vec``.
"""

from __future__ import annotations

from vllm_ddtree.adapter.config import is_ddtree
from vllm_ddtree.adapter.runner import ACTIVE_TREE_ATTENTION, count_tree_attention_call
from vllm_ddtree.kv_commit import paged_kv_views
from vllm_ddtree.tree_attention import tree_attention_reference

ADDRESSABLE_ISAS = ("vec", "vec16")


def required_internals():
    from vllm.v1.attention.backends import cpu_attn

    return [
        ("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward",
         hasattr(getattr(cpu_attn, "CPUAttentionBackendImpl", None), "forward")),
        ("vllm.v1.attention.backends.cpu_attn.CPUAttentionMetadataBuilder._set_isa_to_layers",
         hasattr(getattr(cpu_attn, "CPUAttentionMetadataBuilder", None), "_set_isa_to_layers")),
    ]


def apply() -> None:
    from vllm.v1.attention.backends import cpu_attn

    impl, builder = cpu_attn.CPUAttentionBackendImpl, cpu_attn.CPUAttentionMetadataBuilder
    if getattr(impl, "_ddtree_patched", False):
        return
    original_forward = impl.forward
    original_builder_init = builder.__init__

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        tree = ACTIVE_TREE_ATTENTION[0]
        if tree is None or attn_metadata is None or attn_metadata.causal is not True:
            return original_forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                                    output_scale, output_block_scale)
        if layer.isa not in ADDRESSABLE_ISAS:
            raise RuntimeError(f"ddtree cannot read the CPU KV cache in ISA {layer.isa!r} layout")
        n = attn_metadata.num_actual_tokens
        keys, values = paged_kv_views(kv_cache, "cpu")
        tree_attention_reference(query[:n].view(n, self.num_heads, self.head_size), keys, values, tree,
                                 self.scale, out=output[:n].view(n, self.num_heads, self.head_size))
        count_tree_attention_call()
        return output

    def builder_init(self, kv_cache_spec, layer_names, vllm_config, device):
        original_builder_init(self, kv_cache_spec, layer_names, vllm_config, device)
        if is_ddtree(vllm_config.speculative_config) and self.isa not in ADDRESSABLE_ISAS:
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)

    impl.forward = forward
    builder.__init__ = builder_init
    impl._ddtree_patched = True
