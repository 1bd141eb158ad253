"""How a target attention layer learns, per call, whether it computes a tree step.

The runner attaches the step's :class:`~vllm_ddtree.tree_attention.TreeAttentionMetadata` to the
target layers' own attention metadata (attribute :data:`TREE_METADATA`), which vLLM hands each
layer's ``impl.forward`` from its forward context. A hooked ``forward`` runs vLLM's code unless that
attribute is set; it is an attribute of the layer's ``impl`` instance, so only a ddtree engine's target
layers carry it. The backend-specific tree forwards are in ``cpu_attention`` and ``gpu_attention``.
"""

from __future__ import annotations

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
    if getattr(impl.forward, "_ddtree_hook", False):
        return
    original = impl.forward

    def forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        if tree_metadata(attn_metadata) is None:
            return original(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        return tree_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

    forward._ddtree_hook = True
    impl.forward = forward


def hook_target_layer(name: str, layer) -> None:
    """Hooks one target layer with its backend's tree forward; refuses (at engine start) a backend or
    a layer feature the tree path does not compute."""
    from vllm_ddtree.adapter import cpu_attention, gpu_attention

    if cpu_attention.serves(layer.impl):
        cpu_attention.hook(name, layer)
    elif gpu_attention.serves(layer.impl):
        gpu_attention.hook(name, layer)
    else:
        raise ValueError(f'speculative_config method "ddtree" runs tree attention on vLLM\'s CPU, FLASH_ATTN and '
                         f"TRITON_ATTN backends; target layer {name} uses {type(layer.impl).__name__}: start the "
                         "engine with --attention-backend FLASH_ATTN (or TRITON_ATTN)")
