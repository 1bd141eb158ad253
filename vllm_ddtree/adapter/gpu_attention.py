"""Round step 3 on GPUs: vLLM's FlashAttention and Triton backends run the tree-attention kernel.

In vLLM 0.32 both backends write the step's K/V into the paged cache before ``forward`` (their
``forward_includes_kv_cache_update`` is False), and both keep it as ``[blocks, kv_heads, block_size,
2 * head_dim]`` (our ``"vllm"`` layout). On a step that verifies trees, the target's attention
``forward`` is therefore replaced by one launch of :func:`vllm_ddtree.tree_attention.tree_attention`
over the same cache: it handles the whole mixed batch (prefill, decode and tree rows). Every other
call (no trees, the drafter's non-causal pass, encoder attention, profiling) stays vLLM's.

The hook runs in eager Python, so ddtree needs piecewise CUDA graphs (attention outside the graph);
:mod:`vllm_ddtree.adapter.config` sets that mode. What the kernel does not implement (ALiBi, logit
soft-capping, attention sinks, sliding windows, quantized KV caches) is refused on the first tree
step, before any output is produced.
"""

from __future__ import annotations

from vllm_ddtree.adapter.runner import ACTIVE_TREE_ATTENTION, count_tree_attention_call
from vllm_ddtree.kv_commit import paged_kv_views
from vllm_ddtree.tree_attention import tree_attention

BACKENDS = ("flash_attn.FlashAttentionImpl", "triton_attn.TritonAttentionImpl")


def _impl_classes():
    import importlib

    for path in BACKENDS:
        module, name = path.split(".")
        yield path, getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), name, None)


def required_internals():
    return [(f"vllm.v1.attention.backends.{path}.forward", hasattr(cls, "forward")) for path, cls in _impl_classes()]


def unsupported_features(impl) -> list[str]:
    """What of this attention layer the tree kernel cannot compute."""
    found = []
    if getattr(impl, "alibi_slopes", None) is not None:
        found.append("ALiBi")
    if getattr(impl, "logits_soft_cap", None):
        found.append("logit soft-capping")
    if getattr(impl, "sinks", None) is not None:
        found.append("attention sinks")
    if getattr(impl, "sliding_window", None) not in (None, (-1, -1)):
        found.append("sliding-window attention")
    if str(getattr(impl, "kv_cache_dtype", "auto")) not in ("auto", "bfloat16", "float16"):
        found.append(f"KV cache dtype {impl.kv_cache_dtype!r}")
    if getattr(impl, "dcp_world_size", 1) > 1:
        found.append("decode context parallelism")
    return found


def tree_forward(impl, query, kv_cache, attn_metadata, output, meta):
    """The tree-step attention of one layer, written into ``output``."""
    missing = unsupported_features(impl)
    if missing:
        raise NotImplementedError(f"ddtree's tree attention does not support {', '.join(missing)} "
                                  f"({type(impl).__name__}); use method 'dflash' for this target")
    n = attn_metadata.num_actual_tokens
    keys, values = paged_kv_views(kv_cache, "vllm")
    tree_attention(query[:n], keys, values, meta, impl.scale,
                   out=output[:n].view(n, impl.num_heads, impl.head_size))
    count_tree_attention_call()
    return output


def apply() -> None:
    from vllm.v1.attention.backend import AttentionType

    for _, cls in _impl_classes():
        if getattr(cls, "_ddtree_patched", False):
            continue

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                    output_block_scale=None, _original=cls.forward):
            meta = ACTIVE_TREE_ATTENTION[0]
            if (meta is None or attn_metadata is None or self.attn_type != AttentionType.DECODER
                    or attn_metadata.causal is not True):
                return _original(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("ddtree's tree attention does not support fused output quantization")
            return tree_forward(self, query, kv_cache, attn_metadata, output, meta)

        cls.forward = forward
        cls._ddtree_patched = True
