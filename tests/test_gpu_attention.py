"""The GPU attention hook: vLLM's FlashAttention and Triton backend layers, hooked by a ddtree engine,
compute a tree step with our kernel over their own cache layout.

These tests hook instances of the real backend classes and call their ``forward`` on CPU tensors with
the Triton kernel interpreted: the only way FLASH_ATTN's hook runs here (its kernels are CUDA). A whole
engine on TRITON_ATTN, whose hook shares everything with FLASH_ATTN's, runs end to end in
``test_emulated_gpu.py``.
"""

from types import SimpleNamespace

import pytest
import torch
from test_tree_attention import MIXED, make_batch

from vllm_ddtree.tree_attention import tree_attention_reference

LAYER = "model.layers.0.self_attn.attn"


def _impl(cls_name, num_heads, head_size, cls=None, **overrides):
    from vllm.v1.attention.backend import AttentionType

    from vllm_ddtree.adapter.attention import gpu

    cls = cls or {c.__name__: c for c in gpu._impl_classes()}[cls_name]
    impl = object.__new__(cls)  # the GPU-only __init__ probes CUDA; the hook reads these attributes
    attrs = dict(num_heads=num_heads, head_size=head_size, scale=head_size ** -0.5, attn_type=AttentionType.DECODER,
                 alibi_slopes=None, logits_soft_cap=0, sinks=None, sliding_window=(-1, -1), kv_cache_dtype="auto",
                 dcp_world_size=1, vllm_flash_attn_version=2)
    attrs.update(overrides)
    impl.__dict__.update(attrs)
    return impl


def _hooked(impl):
    from vllm_ddtree.adapter.attention import backend_of

    layer = SimpleNamespace(impl=impl)
    backend_of(LAYER, layer).hook(LAYER, layer)
    return impl


@pytest.mark.parametrize("cls_name", ["FlashAttentionImpl", "TritonAttentionImpl"])
def test_tree_step_runs_the_tree_kernel_over_the_backends_cache(cls_name, device):
    gen = torch.Generator().manual_seed(7)
    query, keys, values, meta, kv_cache = make_batch(MIXED, 15, 16, 2, 4, 64, torch.bfloat16, "vllm", gen, device,
                                                     with_cache=True)
    impl = _hooked(_impl(cls_name, 8, 64))
    n = query.shape[0]
    output = torch.full((n + 5, 8 * 64), float("nan"), dtype=query.dtype, device=device)  # padded like vLLM's
    padded_query = torch.cat([query, torch.zeros(5, 8, 64, dtype=query.dtype, device=device)])
    # The step's tree metadata rides on the layer's own attention metadata, as the runner attaches it.
    attn_metadata = SimpleNamespace(num_actual_tokens=n, causal=True, ddtree_tree=meta)
    got = impl.forward(None, padded_query, None, None, kv_cache, attn_metadata, output=output)
    assert got is output
    want = tree_attention_reference(query, keys, values, meta, impl.scale)
    torch.testing.assert_close(output[:n].view(n, 8, 64).float(), want.float(), atol=2e-2, rtol=2e-2)


def test_steps_without_trees_stay_with_vllm(device):
    impl = _hooked(_impl("FlashAttentionImpl", 8, 64))
    output = torch.ones(4, 8 * 64)
    # vLLM's own forward: its profiling run (no metadata) zero-fills the output.
    assert impl.forward(None, torch.ones(4, 8, 64), None, None, torch.zeros(1), None, output=output) is output
    assert output.abs().sum() == 0


def test_the_hook_passes_every_argument_through_unchanged():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    calls = []

    class Recording(FlashAttentionImpl):
        def forward(self, *args, **kwargs):
            calls.append((args, kwargs))
            return "vllm's result"

    impl = _hooked(_impl(None, 8, 64, cls=Recording))
    metadata = SimpleNamespace(num_actual_tokens=3)  # no tree on it: a step vLLM computes
    assert impl.forward("layer", "q", "k", "v", "cache", metadata, "out", output_scale=None, a_future_argument=1) \
        == "vllm's result"
    assert calls == [(("layer", "q", "k", "v", "cache", metadata, "out"), {"output_scale": None,
                                                                           "a_future_argument": 1})]
    assert type(impl).forward is Recording.forward  # the class stays vLLM's; only this instance is hooked


@pytest.mark.parametrize("overrides, named", [({"logits_soft_cap": 30.0}, "logit soft-capping"),
                                              ({"alibi_slopes": torch.ones(8)}, "ALiBi"),
                                              ({"sliding_window": (127, 0)}, "sliding-window"),
                                              ({"kv_cache_dtype": "fp8"}, "KV cache dtype 'fp8'")])
def test_unsupported_layer_features_are_refused_when_hooked(overrides, named):
    # Hooking happens at engine start: a layer the kernel cannot compute stops the start, not a step.
    with pytest.raises(ValueError, match=f'method "ddtree" does not support {named}.*target layer {LAYER}'):
        _hooked(_impl("TritonAttentionImpl", 8, 64, **overrides))


def test_an_unhooked_backend_is_refused_when_hooked():
    class OtherBackendImpl:
        pass

    with pytest.raises(ValueError, match=f"target layer {LAYER} uses OtherBackendImpl: .*--attention-backend FLASH_ATTN"):
        _hooked(OtherBackendImpl())


def test_warm_up_compiles_the_step_kernels_without_touching_the_cache(device, monkeypatch):
    # What an engine on a GPU runs at start (the interpreter here): every split variant of the tree
    # kernel and the KV commit kernel, on the layer's own cache, which stays as it was.
    from vllm_ddtree import tree_attention as module
    from vllm_ddtree.adapter.attention import gpu

    gen = torch.Generator().manual_seed(11)
    *_, kv_cache = make_batch(MIXED[:2], 15, 16, 2, 4, 64, torch.bfloat16, "vllm", gen, device, with_cache=True)
    before = kv_cache.clone()
    launches = []
    launch = module.tree_attention

    def counted(*args, **kwargs):
        launches.append(kwargs["num_splits"])
        return launch(*args, **kwargs)

    monkeypatch.setattr(module, "tree_attention", counted)
    gpu.warm_up(SimpleNamespace(impl=_impl("FlashAttentionImpl", 8, 64), kv_cache=kv_cache), budget=15,
                          depth=7, dtype=torch.bfloat16)
    assert tuple(launches) == module.SPLIT_CHOICES
    assert torch.equal(kv_cache, before)
