"""What a ddtree engine does at start, on either model runner: inside vLLM's memory profile the
largest tree step's memory is reserved; after vLLM allocated its KV cache the target's attention
layers get the tree path, the step warms up, and a cost-aware engine gets its step costs."""

from __future__ import annotations

import torch

from vllm_ddtree.adapter import attention
from vllm_ddtree.adapter.memory import reserve_tree_step_memory
from vllm_ddtree.adapter.state import DDTreeState
from vllm_ddtree.budget import AcceptanceCalibration
from vllm_ddtree.tree import build_tree


def reserve_tree_step(state: DDTreeState, runner, drafter_layers) -> tuple[int, int]:
    """Called right after vLLM's dummy sampler run in its memory profile (and the GPU worker's sampler
    warm-up, after the KV cache is allocated: the same peak again): reserves the tree step's peak
    (:mod:`~vllm_ddtree.adapter.memory`). The layers are not hooked yet; their backend is known from
    the model (``drafter_layers``: the drafter's layer names, left out)."""
    backend = attention.target_backend(runner.compilation_config.static_forward_context, drafter_layers)
    scheduler = runner.scheduler_config
    return reserve_tree_step_memory(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, state.options.budget,
                                    state.options.depth, runner.model_config.get_vocab_size(),
                                    runner.model_config.dtype, runner.device, builder=backend.TREE_BUILDER)


def attach_target_layers(state: DDTreeState, layers: dict[str, object], drafter_layers, kv_cache_groups,
                         model_config, device) -> None:
    """Hooks every target attention layer for tree steps (``state.target``) and warms the step up.

    ``layers``: vLLM's layer name -> layer (its static forward context); ``drafter_layers``: the
    drafter's layer names among them; ``kv_cache_groups``: the engine's KV cache groups. Raises at
    engine start for a target the tree path cannot serve: layers spread over several KV cache
    groups, or an attention backend or layer feature the tree kernel does not compute. The tree
    build runs once at the engine's shapes (with a GPU backend its Triton kernel compiles, on CPU the
    beams' index grids are made) and the attention backend warms up, so that no live step waits for
    either.
    """
    group_of = {name: i for i, group in enumerate(kv_cache_groups)
                for name in group.layer_names if name not in drafter_layers}
    if len(set(group_of.values())) != 1:
        raise ValueError(f'speculative_config method "ddtree" needs the target\'s attention layers in one KV cache '
                         f"group (one block table for the tree); this target has {len(set(group_of.values()))}")
    state.target = attention.hook_target_layers({name: layers[name] for name in group_of},
                                                next(iter(group_of.values())))
    budget, depth = state.options.budget, state.options.depth
    vocab = model_config.get_vocab_size()
    build_tree(torch.zeros(1, depth, min(budget, vocab), device=device), budget,
               builder=state.target.backend.TREE_BUILDER)
    attention.warm_up(state.target, budget, depth, model_config.dtype)


def set_up_budget(state: DDTreeState, runner) -> None:
    """A cost-aware engine's step-cost tables (on the device and the host) and its acceptance
    calibration, once the target's layers are hooked (:mod:`~vllm_ddtree.adapter.step_costs` times
    the engine's own steps); nothing for a fixed budget."""
    if state.options.policy != "cost-aware":
        return
    from vllm.logger import init_logger

    from vllm_ddtree.adapter.step_costs import step_costs

    state.costs = step_costs(runner, state, init_logger("vllm.ddtree"))
    state.costs_host = state.costs.to("cpu")
    state.calibration = AcceptanceCalibration(runner.device)
