"""``method: "ddtree"`` in vLLM's config classes.

vLLM's method field is a closed ``Literal`` and every DFlash code path keys on ``method == "dflash"``.
A ddtree config is therefore built as a dflash config (same drafter loading, aux hidden states, draft
KV cache) that carries one record of ours, :class:`~vllm_ddtree.adapter.options.DDTreeOptions` (B, D,
the budget policy, a user's cost table), read with :func:`ddtree_options`. It travels with the config
wherever vLLM pickles it (engine core, workers). ddtree's two keys of its own, ``ddtree_budget`` (the
policy) and ``ddtree_step_costs`` (a user's cost table), are added to vLLM's config class, which
forbids unknown keys; other methods refuse them.

A ddtree engine runs on the model runner vLLM picks (V2 on GPUs, V1 on vLLM 0.32's CPU build, or
what ``VLLM_USE_V2_MODEL_RUNNER`` asks for; vLLM 0.34 has only V2), logged once by the runner hook
(:func:`hook_ddtree_runners`). It also gets, in ``VllmConfig``, each logged when it applies: on GPUs
piecewise CUDA graphs instead of full ones
(the tree-attention hook decides per step in eager Python, outside the captured pieces); async
scheduling off; attention + quantization fusion off. What it cannot run under is refused here,
before the engine starts (:mod:`vllm_ddtree.adapter.support` has the rules).

The patches (through :mod:`~vllm_ddtree.adapter.patching`) act on construction only
(``__post_init__`` and two ``VllmConfig`` / ``SpeculativeConfig`` members): other engines pay one
test when their config is built.
"""

from __future__ import annotations

import functools
import typing

from vllm_ddtree.adapter import compat, patching
from vllm_ddtree.adapter.options import DDTreeOptions, check_budget, drafter_depth, local_drafter_depth_hint
from vllm_ddtree.adapter.support import check_engine_settings, check_target, check_v2_settings, refusal

METHOD = "ddtree"


def ddtree_options(speculative_config) -> DDTreeOptions | None:
    """The ddtree options a (speculative or engine) config carries, or None for any other method."""
    spec = getattr(speculative_config, "speculative_config", speculative_config)  # a VllmConfig too
    return None if spec is None else spec.__dict__.get("ddtree")


def is_ddtree(speculative_config) -> bool:
    return ddtree_options(speculative_config) is not None


# ddtree's own keys in the speculative config (vLLM's config forbids unknown keys, so they are added
# to its class): the budget policy, and a user's step-cost table for the cost-aware policy.
OPTIONS = {
    "ddtree_budget": (typing.Optional[typing.Literal["cost-aware", "fixed"]], None),
    "ddtree_step_costs": (typing.Optional[typing.Union[str, dict]], None),
}


def hook_ddtree_instances(cls, hook_instance) -> None:
    """``hook_instance(self)`` after ``cls.__init__`` for an instance built for a ddtree config
    (``self.vllm_config``); any other instance is untouched."""
    def make(original_init):
        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if is_ddtree(self.vllm_config.speculative_config):
                hook_instance(self)

        return __init__

    patching.wrap(cls, "__init__", make)


def hook_ddtree_runners(runner_cls, name: str, building, patch_instance) -> None:
    """``runner_cls.__init__`` (vLLM's model runner ``name``), once: a runner built for a ddtree
    config gets its :class:`~vllm_ddtree.adapter.state.DDTreeState` (``runner.ddtree_state``), is built
    inside ``building(state)`` (a context: vLLM's names swapped so that it builds ddtree's drafter),
    then ``patch_instance(runner, state)``; a runner built for any other config is untouched."""
    from vllm.logger import init_logger

    from vllm_ddtree.adapter.state import DDTreeState

    def make(original_init):
        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):
            vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
            options = ddtree_options(vllm_config)
            if options is None:
                return original_init(self, *args, **kwargs)
            init_logger("vllm.ddtree").info_once("ddtree: on vLLM's %s (the runner vLLM chose)", name)
            state = self.ddtree_state = DDTreeState(options)
            with building(state):
                original_init(self, *args, **kwargs)
            patch_instance(self, state)

        return __init__

    patching.wrap(runner_cls, "__init__", make)


def apply() -> None:
    """Makes ``"ddtree"`` a working method, with its options (idempotent): on vLLM 0.34+ through its
    custom-method interface (:mod:`~vllm_ddtree.adapter.custom_method`), before that in vLLM's config
    classes."""
    if compat.has_custom_methods():
        from vllm_ddtree.adapter import custom_method

        custom_method.register()
    else:
        _accept_method(_build_ddtree, OPTIONS)
    _apply_engine_defaults()


def refuse(message: str) -> None:
    """Makes ``"ddtree"`` a known method that is refused with ``message`` (an incompatible vLLM)."""
    if compat.has_custom_methods():
        from vllm_ddtree.adapter import custom_method

        custom_method.register_refusal(message)
        return

    def refused(config, *_):
        raise ValueError(message)

    _accept_method(refused)


def _accept_method(build, options=None) -> None:
    from vllm.config import speculative

    cls = speculative.SpeculativeConfig
    if patching.is_patched(cls.__post_init__):
        return
    widened = typing.Optional[typing.Literal[tuple(_literal_values(speculative.SpeculativeMethod)) + (METHOD,)]]
    patching.extend_config_class(cls, {"method": widened}, options or {})

    def make(original):
        @functools.wraps(original)
        def __post_init__(self, *args, **kwargs):
            if self.method != METHOD:
                given = [name for name in options or {} if getattr(self, name, None) is not None]
                if given:
                    raise ValueError(f"speculative_config keys {given} belong to method \"ddtree\"; method "
                                     f"{self.method!r} does not take them")
                return original(self, *args, **kwargs)
            build(self, original, *args, **kwargs)

        return __post_init__

    patching.wrap(cls, "__post_init__", make)


def _build_ddtree(config, original, *args, **kwargs) -> None:
    budget = check_budget(config.num_speculative_tokens)  # before anything loads
    _refuse_unsupported_platform()
    if config.disable_padded_drafter_batch:
        raise refusal("disable_padded_drafter_batch=True (the tree commit addresses the padded batch)",
                      "remove disable_padded_drafter_batch")
    depth_hint = local_drafter_depth_hint(config.model)
    config.method = "dflash"
    original(config, *args, **kwargs)
    target = config.target_model_config
    depth = drafter_depth(config.draft_model_config.hf_config, target.get_total_num_hidden_layers(),
                          target.get_hidden_size(), target.get_vocab_size(), depth_hint)
    check_target(target)
    # Validated when made (a bad table fails here, before the engine starts).
    config.__dict__["ddtree"] = DDTreeOptions(budget, depth, config.ddtree_budget or "cost-aware",
                                              config.ddtree_step_costs)


def _apply_engine_defaults() -> None:
    from vllm.config import speculative
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.vllm import VllmConfig
    from vllm.logger import init_logger

    if patching.is_patched(VllmConfig.__post_init__):
        return
    log = init_logger("vllm.ddtree")  # a child of vLLM's logger: its level, handler, format, info_once

    def slots_for_drafting(slots):
        def max_num_new_slots_for_drafting(self) -> int:
            # The scheduler keeps this many slots per request for the drafter's pass, which adds D query
            # rows per request (DFlash's K), whatever the tree budget B is.
            options = ddtree_options(self)
            return options.depth if options is not None else slots(self)

        return max_num_new_slots_for_drafting

    def piecewise_graphs(config) -> None:
        mode = config.compilation_config.cudagraph_mode
        if mode is not None and mode.has_full_cudagraphs():
            log.info("ddtree: cudagraph_mode %s -> PIECEWISE (tree attention is chosen per step outside the "
                     "captured graphs)", mode.name)
            config.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE

    def graph_mode(override_graphs):
        @functools.wraps(override_graphs)
        def _maybe_override_dynamic_sd_cudagraph_mode(self, *args, **kwargs):
            override_graphs(self, *args, **kwargs)
            if is_ddtree(self.speculative_config):
                piecewise_graphs(self)

        return _maybe_override_dynamic_sd_cudagraph_mode

    custom_methods = compat.has_custom_methods()

    def engine_settings(post_init):
        @functools.wraps(post_init)
        def __post_init__(self, *args, **kwargs):
            if not is_ddtree(self.speculative_config):
                return post_init(self, *args, **kwargs)
            check_engine_settings(self, log)
            if compat.uses_v2_runner(self):
                check_v2_settings(self)
            post_init(self, *args, **kwargs)
            if custom_methods:  # 0.34 resolves its graph mode inside __post_init__, without a hook
                piecewise_graphs(self)
            passes = self.compilation_config.pass_config
            if getattr(passes, "fuse_attn_quant", False):
                log.info("ddtree: attention + quantization fusion off (the tree kernel writes unquantized outputs)")
                passes.fuse_attn_quant = False

        return __post_init__

    if not custom_methods:  # 0.34: the custom method's config sizes the drafter; V2 is vLLM's only runner
        patching.wrap(speculative.SpeculativeConfig, "max_num_new_slots_for_drafting", slots_for_drafting)
        patching.wrap(VllmConfig, "_maybe_override_dynamic_sd_cudagraph_mode", graph_mode)
    patching.wrap(VllmConfig, "__post_init__", engine_settings)  # last: it marks the whole set as applied


def _refuse_unsupported_platform() -> None:
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise ValueError(f'speculative_config method "ddtree" runs on NVIDIA GPUs and vLLM\'s CPU backend; '
                         f"{current_platform.device_name!r} is not supported yet. Use method \"dflash\" with the "
                         "same drafter on this platform.")


def _literal_values(tp) -> tuple:
    """All strings of a (possibly nested) Literal / Union of Literals."""
    if tp is None:
        return ()
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return tuple(a for a in args if isinstance(a, str))
    return tuple(v for a in args for v in _literal_values(a))
