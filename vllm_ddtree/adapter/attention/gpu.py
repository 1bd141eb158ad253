"""Round step 3 on GPUs: vLLM's FlashAttention and Triton backends run the tree-attention kernel.

In vLLM 0.32 both backends write the step's K/V into the paged cache before ``forward`` (their
``forward_includes_kv_cache_update`` is False), and both keep it as ``[blocks, kv_heads, block_size,
2 * head_dim]`` (our ``"vllm"`` layout). On a step that verifies trees, a target layer's attention
``forward`` is therefore replaced by one launch of :func:`vllm_ddtree.tree_attention.tree_attention`
over the same cache: it handles the whole mixed batch (prefill, decode and tree rows). Every other
call (no trees, the drafter's non-causal pass, profiling) stays vLLM's.

The hook runs in eager Python, so ddtree needs piecewise CUDA graphs (attention outside the graph);
:mod:`vllm_ddtree.adapter.config` sets that mode. What the kernel does not implement (ALiBi, logit
soft-capping, attention sinks, sliding windows, quantized KV caches, non-decoder attention) is refused
when the layer is hooked, at engine start.

The rest of a step beside these backends is the GPU path too, whatever the tensors' device (so an
engine emulated with Triton's interpreter runs it, tests/emulated_gpu.py): the one-launch Triton tree
build (:data:`TREE_BUILDER`), the KV commit's Triton kernel (:func:`commit`), split-K for the
device's multiprocessors (:mod:`vllm_ddtree.adapter.cuda_only`), and step costs timed on vLLM's dummy
runs with their attention (:data:`DUMMY_RUN_ATTENTION`).
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter import cuda_only
from vllm_ddtree.adapter.attention.layer_hook import call_output, tree_metadata, wrap_forward
from vllm_ddtree.adapter.support import refusal, unsupported_layer_features
from vllm_ddtree.kv_commit import CommitPlan, commit_accepted_kv, paged_kv_views, plan_commit
from vllm_ddtree.tree_attention import TreeAttentionMetadata, tree_attention, warm_up_tree_attention

BACKENDS = ("flash_attn.FlashAttentionImpl", "triton_attn.TritonAttentionImpl")

# The tree build's one-launch Triton selection (vllm_ddtree.tree.build_tree(builder="kernel")).
TREE_BUILDER = "kernel"

# The drafter's context K/V of a step without drafts is written in that step: one small launch
# sequence on a GPU, where gathering rows would only add copies.
CONTEXT_WRITE_STEPS = 1

# vLLM's dummy runs (step-cost timing) run these backends' attention on dummy metadata, as vLLM's own
# warm-up and graph capture do; a tree step's attention costs about what their causal rows cost.
DUMMY_RUN_ATTENTION = True


def _impl_classes():
    import importlib

    for path in BACKENDS:
        module, name = path.split(".")
        yield getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"), name)


def serves(impl) -> bool:
    return isinstance(impl, tuple(_impl_classes()))


def cache_layout(name: str, layer) -> str:
    """Both backends' caches are vLLM's ``"vllm"`` layout (see the module docstring)."""
    return "vllm"


def plan(meta: TreeAttentionMetadata, target) -> None:
    """Nothing to plan: the kernel reads the step's metadata as it is."""


def hook(name: str, layer) -> None:
    """Gives one target layer the tree kernel on tree steps (an instance attribute of its ``impl``)."""
    impl = layer.impl
    missing = unsupported_layer_features(impl)
    if missing:
        raise refusal(f"{', '.join(missing)} in its tree attention (target layer {name}, {type(impl).__name__})")

    def tree_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        output = call_output(args, kwargs)
        n = attn_metadata.num_actual_tokens
        keys, values = paged_kv_views(kv_cache, "vllm")
        tree_attention(query[:n], keys, values, tree_metadata(attn_metadata), impl.scale,
                       out=output[:n].view(n, impl.num_heads, impl.head_size),
                       multiprocessors=cuda_only.multiprocessors(query.device))
        return output

    wrap_forward(impl, tree_forward)


def commit(kv_caches: list[torch.Tensor], layout: str, plan: CommitPlan) -> None:
    """The KV commit: the Triton kernel, one launch per key or value view, no host read."""
    commit_accepted_kv([view for cache in kv_caches for view in paged_kv_views(cache, layout)], plan, use_triton=True)


def extra_tree_attention(state, requests: int) -> None:
    """Nothing beyond the dummy run's rows (see :data:`DUMMY_RUN_ATTENTION`)."""


def warm_up(layer, budget: int, depth: int, dtype: torch.dtype) -> None:
    """At engine start: compiles the step's Triton kernels for this target geometry (every layer of a
    ddtree target shares it), as vLLM's DFlash warms its own kernels, so that the first live tree
    step does not wait for Triton. Reads the layer's cache; the commit's plan moves nothing."""
    impl = layer.impl
    keys, values = paged_kv_views(layer.kv_cache, "vllm")
    warm_up_tree_attention(keys, values, impl.num_heads, impl.head_size, impl.scale, budget, dtype)
    dev = keys.device
    page = keys.shape[1]
    nothing_accepted = torch.full((1, depth + 1), -1, dtype=torch.int64, device=dev)
    nothing_accepted[:, 0] = 0
    plan = plan_commit(torch.zeros(1, -(-(budget + 1) // page), dtype=torch.int32, device=dev), page,
                       torch.zeros(1, dtype=torch.int64, device=dev), nothing_accepted)
    commit_accepted_kv([keys, values], plan, use_triton=True)
