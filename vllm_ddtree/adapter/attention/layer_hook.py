"""How a target attention layer learns, per call, whether it computes a tree step: what every
backend's hook shares.

The runner attaches the step's :class:`~vllm_ddtree.tree_attention.TreeAttentionMetadata` to the
target layers' own attention metadata (attribute :data:`TREE_METADATA`), which vLLM hands each
layer's ``impl.forward`` from its forward context, as vLLM's backends read their own metadata. A
hooked ``forward`` runs vLLM's code unless that attribute is set; it is an attribute of the layer's
``impl`` instance, so only a ddtree engine's target layers carry it.
"""

from __future__ import annotations

from vllm_ddtree.adapter import patching

# The attribute of a target layer's attention metadata that carries the step's tree metadata.
TREE_METADATA = "ddtree_tree"


def tree_metadata(attn_metadata):
    """The step's tree metadata if this call computes a tree step, else None."""
    return getattr(attn_metadata, TREE_METADATA, None)


def call_output(args: tuple, kwargs: dict):
    """The ``output`` buffer of an ``impl.forward(layer, q, k, v, kv_cache, attn_metadata, ...)`` call."""
    if kwargs.get("output_scale") is not None or kwargs.get("output_block_scale") is not None:
        # ddtree engines turn vLLM's attention + quantization fusion off (adapter.config).
        raise NotImplementedError("ddtree's tree attention does not support fused output quantization")
    return kwargs["output"] if "output" in kwargs else args[0]


def wrap_forward(impl, tree_forward) -> None:
    """Makes ``impl.forward`` run ``tree_forward`` (same arguments) on tree steps; idempotent."""
    def make(original):
        def forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            if tree_metadata(attn_metadata) is None:
                return original(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            return tree_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

        return forward

    patching.wrap(impl, "forward", make)
