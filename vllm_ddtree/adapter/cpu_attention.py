"""Round step 3 on vLLM's CPU backend: its attention kernel cannot take a mask, so the target forward
of a step that verifies trees runs the dense-mask path over the same paged cache for the whole batch
(:func:`vllm_ddtree.tree_attention.tree_attention_dense`, planned once per step, reused by every
layer). Steps without trees and the drafter's own non-causal pass stay on vLLM's kernel.

It reads the cache through the ``"cpu"`` views, which match the ``vec``/``vec16`` ISAs; for
a ddtree engine the ``amx`` ISA (bf16 on AMX machines, pair-packed) is therefore replaced by ``vec``.
"""

from __future__ import annotations

from vllm_ddtree.adapter.config import is_ddtree
from vllm_ddtree.adapter.runner import ACTIVE_TREE_ATTENTION, count_tree_attention_call
from vllm_ddtree.kv_commit import paged_kv_views
from vllm_ddtree.tree_attention import plan_dense, tree_attention_dense

ADDRESSABLE_ISAS = ("vec", "vec16")
_PLAN: list = [None, None]  # (the step's metadata, its dense plan): every layer of a step shares it


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
        if _PLAN[0] is not tree:
            _PLAN[:] = [tree, plan_dense(tree, keys.shape[1])]
        tree_attention_dense(query[:n].view(n, self.num_heads, self.head_size), keys, values, tree, self.scale,
                             out=output[:n].view(n, self.num_heads, self.head_size), plan=_PLAN[1])
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
