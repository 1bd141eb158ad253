"""The GPU attention hook: vLLM's FlashAttention and Triton backend classes, patched by the plugin,
compute a tree step with our kernel over their own cache layout.

vLLM's GPU kernels do not exist in the CPU build, so these tests call the real patched ``forward`` of
each backend class on CPU tensors with the Triton kernel interpreted; the engine around it is tested
end to end on the CPU backend (``test_vllm_e2e.py``), whose hook shares everything but the cache view.
"""

from types import SimpleNamespace

import pytest
import torch
from test_tree_attention import MIXED, make_batch

from vllm_ddtree.tree_attention import tree_attention_reference



def _impl(cls_name, num_heads, head_size, **overrides):
    from vllm.v1.attention.backend import AttentionType

    from vllm_ddtree.adapter import gpu_attention
    from vllm_ddtree.plugin import register

    register()
    cls = dict((path.split(".")[1], c) for path, c in gpu_attention._impl_classes())[cls_name]
    impl = object.__new__(cls)  # the GPU-only __init__ probes CUDA; the hook reads these attributes
    attrs = dict(num_heads=num_heads, head_size=head_size, scale=head_size ** -0.5, attn_type=AttentionType.DECODER,
                 alibi_slopes=None, logits_soft_cap=0, sinks=None, sliding_window=(-1, -1), kv_cache_dtype="auto",
                 dcp_world_size=1, vllm_flash_attn_version=2)
    attrs.update(overrides)
    impl.__dict__.update(attrs)
    return impl


@pytest.mark.parametrize("cls_name", ["FlashAttentionImpl", "TritonAttentionImpl"])
def test_tree_step_runs_the_tree_kernel_over_the_backends_cache(cls_name, device):
    from vllm_ddtree.adapter.runner import ACTIVE_TREE_ATTENTION

    gen = torch.Generator().manual_seed(7)
    query, keys, values, meta, kv_cache = make_batch(MIXED, 15, 16, 2, 4, 64, torch.bfloat16, "vllm", gen, device,
                                                     with_cache=True)
    impl = _impl(cls_name, 8, 64)
    n = query.shape[0]
    output = torch.full((n + 5, 8 * 64), float("nan"), dtype=query.dtype, device=device)  # padded like vLLM's
    padded_query = torch.cat([query, torch.zeros(5, 8, 64, dtype=query.dtype, device=device)])
    attn_metadata = SimpleNamespace(num_actual_tokens=n, causal=True)
    ACTIVE_TREE_ATTENTION[0] = meta
    try:
        got = impl.forward(None, padded_query, None, None, kv_cache, attn_metadata, output)
    finally:
        ACTIVE_TREE_ATTENTION[0] = None
    assert got is output
    want = tree_attention_reference(query, keys, values, meta, impl.scale)
    torch.testing.assert_close(output[:n].view(n, 8, 64).float(), want.float(), atol=2e-2, rtol=2e-2)


def test_steps_without_trees_stay_with_vllm(device):
    impl = _impl("FlashAttentionImpl", 8, 64)
    output = torch.ones(4, 8 * 64)
    # vLLM's own forward: its profiling run (no metadata) zero-fills the output.
    assert impl.forward(None, torch.ones(4, 8, 64), None, None, torch.zeros(1), None, output) is output
    assert output.abs().sum() == 0


@pytest.mark.parametrize("overrides, named", [({"logits_soft_cap": 30.0}, "logit soft-capping"),
                                              ({"alibi_slopes": torch.ones(8)}, "ALiBi"),
                                              ({"sliding_window": (127, 0)}, "sliding-window"),
                                              ({"kv_cache_dtype": "fp8"}, "KV cache dtype 'fp8'")])
def test_unsupported_layer_features_are_refused(overrides, named, device):
    from vllm_ddtree.adapter.runner import ACTIVE_TREE_ATTENTION

    gen = torch.Generator().manual_seed(1)
    query, _, _, meta, kv_cache = make_batch(MIXED[:2], 15, 16, 2, 4, 64, torch.bfloat16, "vllm", gen, device,
                                             with_cache=True)
    impl = _impl("TritonAttentionImpl", 8, 64, **overrides)
    ACTIVE_TREE_ATTENTION[0] = meta
    try:
        with pytest.raises(NotImplementedError, match=named):
            impl.forward(None, query, None, None, kv_cache, SimpleNamespace(num_actual_tokens=query.shape[0],
                                                                            causal=True), torch.empty_like(query))
    finally:
        ACTIVE_TREE_ATTENTION[0] = None
