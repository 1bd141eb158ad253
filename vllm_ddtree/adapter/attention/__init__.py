"""Round step 3 in vLLM: the target layers' tree attention, one module per kind of vLLM attention
backend, each offering the same few functions:

* ``serves(impl)``: whether it computes tree steps for a layer with this vLLM ``impl``;
* ``hook(name, layer)``: gives the layer the tree path on tree steps (refuses, at engine start, what
  the tree path cannot compute);
* ``cache_layout(name, layer)``: the :data:`vllm_ddtree.kv_commit.LAYOUTS` entry of its cache;
* ``plan(meta, target)``: the step's plan for every layer of ``target``, made once per step before the forward;
* ``warm_up(layer, budget, depth, dtype)``: at engine start, what would otherwise wait for the first
  tree step (compiles);

and the choices of the rest of the step that go with the backend (never with the tensors' device, so
that an emulated GPU engine runs the GPU path: tests/emulated_gpu.py):

* ``commit(kv_caches, layout, plan)``: round step 5's KV commit;
* ``TREE_BUILDER``: the tree builder (:func:`vllm_ddtree.tree.build_tree`'s ``builder``);
* ``CONTEXT_WRITE_STEPS``: how many steps without drafts the V1 drafter may gather its context rows
  before it writes their K/V in one pass (1: every step, as DFlash does);
* ``DUMMY_RUN_ATTENTION`` and ``extra_tree_attention(state, requests)``: how step costs are timed
  (:mod:`vllm_ddtree.adapter.step_costs`).

:data:`BACKENDS`: :mod:`.cpu` (vLLM's CPU backend) and :mod:`.gpu` (FLASH_ATTN, TRITON_ATTN).
:func:`hook_target_layers` picks the backend of the layers in use and hooks them all.
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter.attention import cpu, gpu
from vllm_ddtree.adapter.attention.layer_hook import TREE_METADATA
from vllm_ddtree.adapter.state import TargetLayers
from vllm_ddtree.adapter.support import refusal

BACKENDS = (cpu, gpu)
__all__ = ["BACKENDS", "TREE_METADATA", "backend_of", "hook_target_layers", "target_backend", "warm_up"]


def backend_of(name: str, layer):
    """The backend module that serves ``layer``; refuses (at engine start) a backend without one."""
    for backend in BACKENDS:
        if backend.serves(layer.impl):
            return backend
    raise ValueError(f'speculative_config method "ddtree" runs tree attention on vLLM\'s CPU, FLASH_ATTN and '
                     f"TRITON_ATTN backends; target layer {name} uses {type(layer.impl).__name__}: start the "
                     "engine with --attention-backend FLASH_ATTN (or TRITON_ATTN)")


def target_backend(layers: dict[str, object], drafter_layers) -> object:
    """The backend of the target's attention layers (``name -> layer``, the drafter's names left out),
    known from the model alone: for what runs before the layers are hooked (vLLM's memory profile)."""
    name, layer = next((n, layer) for n, layer in layers.items() if hasattr(layer, "impl") and n not in drafter_layers)
    return backend_of(name, layer)


def hook_target_layers(layers: dict[str, object], kv_group: int) -> TargetLayers:
    """Hooks every target attention layer (``name -> vLLM attention layer``, one KV cache group) with
    its backend's tree path, and notes the caches the commit moves, each once (layers may share one).
    Refuses layers of several backends, cache layouts or cache shapes."""
    caches, layouts, backends = {}, set(), set()
    for name, layer in layers.items():
        backend = backend_of(name, layer)
        backend.hook(name, layer)
        backends.add(backend)
        layouts.add(backend.cache_layout(name, layer))
        caches.setdefault(layer.kv_cache.data_ptr(), layer.kv_cache)
    geometries = {(c.shape, c.stride(), c.dtype) for c in caches.values()}
    if len(layouts) != 1 or len(geometries) != 1 or len(backends) != 1:
        raise refusal(f"target attention layers with different KV cache layouts or shapes ({sorted(layouts)}, "
                      f"{len(geometries)} shapes)")
    return TargetLayers(layers, kv_group, list(caches.values()), layouts.pop(), backends.pop())


def warm_up(target: TargetLayers, budget: int, depth: int, dtype: torch.dtype) -> None:
    """The backend's engine-start warm-up, on the first target layer (every layer shares its geometry)."""
    target.backend.warm_up(next(iter(target.layers.values())), budget, depth, dtype)
