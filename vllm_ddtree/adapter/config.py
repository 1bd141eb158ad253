"""``method: "ddtree"`` in vLLM's config classes.

vLLM's method field is a closed ``Literal`` and every DFlash code path keys on ``method == "dflash"``.
A ddtree config is therefore built as a dflash config (same drafter loading, aux hidden states, draft
KV cache) and marked with plain instance attributes: ``ddtree`` (True), ``ddtree_max_budget`` (B, the
``num_speculative_tokens`` the user gave), ``ddtree_depth`` (D = drafter block size - 1) and
``ddtree_policy`` ("cost-aware", the default, or "fixed"). Plain attributes survive the pickling that
ships configs to the engine and worker processes, and no class of ours has to be importable there
before the plugin loads. ddtree's two keys of its own, ``ddtree_budget`` (the policy) and
``ddtree_step_costs`` (a user's cost table), are added to vLLM's config class, which forbids unknown
keys; other methods refuse them.

A ddtree engine also gets, in ``VllmConfig``, each logged when it applies: the V1 model runner (our
runner hooks are written for it; V2 comes later); on GPUs piecewise CUDA graphs instead of full ones
(the tree-attention hook decides per step in eager Python, outside the captured pieces); async
scheduling off; attention + quantization fusion off. What it cannot run under is refused here,
before the engine starts (:mod:`vllm_ddtree.adapter.support` has the rules).

The hooks are on construction only (``__post_init__`` and two ``VllmConfig`` members): other engines
pay one flag test when their config is built.
"""

from __future__ import annotations

import functools
import typing

from vllm_ddtree.adapter.options import check_budget, drafter_depth, local_drafter_depth_hint
from vllm_ddtree.adapter.support import check_engine_settings, check_target, refusal

METHOD = "ddtree"


def is_ddtree(speculative_config) -> bool:
    return bool(speculative_config is not None and speculative_config.__dict__.get("ddtree", False))


# ddtree's own keys in the speculative config (vLLM's config forbids unknown keys, so they are added
# to its class): the budget policy, and a user's step-cost table for the cost-aware policy.
OPTIONS = {
    "ddtree_budget": (typing.Optional[typing.Literal["cost-aware", "fixed"]], None),
    "ddtree_step_costs": (typing.Optional[typing.Union[str, dict]], None),
}


def hook_ddtree_instances(cls, hook_instance) -> None:
    """A class-level hook on ``cls.__init__`` (idempotent): an instance built for a ddtree config
    (``self.vllm_config``) gets ``hook_instance(self)`` after construction; any other is untouched."""
    original_init = cls.__init__
    if getattr(original_init, "_ddtree_hook", False):
        return

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if is_ddtree(self.vllm_config.speculative_config):
            hook_instance(self)

    __init__._ddtree_hook = True
    cls.__init__ = __init__


def apply() -> None:
    """Makes ``"ddtree"`` a working method, with its options (idempotent)."""
    _accept_method(_build_ddtree, OPTIONS)
    _apply_engine_defaults()


def refuse(message: str) -> None:
    """Makes ``"ddtree"`` a known method that is refused with ``message`` (an incompatible vLLM)."""
    def refused(config, *_):
        raise ValueError(message)

    _accept_method(refused)


def _accept_method(build, options=None) -> None:
    import dataclasses

    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config import speculative

    cls = speculative.SpeculativeConfig
    if getattr(cls, "_ddtree_patched", False):
        return
    widened = typing.Optional[typing.Literal[tuple(_literal_values(speculative.SpeculativeMethod)) + (METHOD,)]]
    cls.__annotations__["method"] = widened
    cls.__dataclass_fields__["method"].type = widened
    for name, (kind, default) in (options or {}).items():
        field = dataclasses.field(default=default)
        field.name, field.type, field._field_type = name, kind, dataclasses._FIELD
        cls.__annotations__[name] = kind
        cls.__dataclass_fields__[name] = field
        setattr(cls, name, default)
    original = cls.__post_init__

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        if self.method != METHOD:
            given = [name for name in options or {} if getattr(self, name, None) is not None]
            if given:
                raise ValueError(f"speculative_config keys {given} belong to method \"ddtree\"; method "
                                 f"{self.method!r} does not take them")
            return original(self, *args, **kwargs)
        build(self, original, *args, **kwargs)

    cls.__post_init__ = __post_init__
    rebuild_dataclass(cls, force=True)
    cls._ddtree_patched = True


def _build_ddtree(config, original, *args, **kwargs) -> None:
    budget = check_budget(config.num_speculative_tokens)
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
    policy = config.ddtree_budget or "cost-aware"
    if config.ddtree_step_costs is not None:
        if policy != "cost-aware":
            raise ValueError('speculative_config "ddtree_step_costs" is the cost table of the cost-aware budget; '
                             'drop it, or drop "ddtree_budget": "fixed"')
        from vllm_ddtree.adapter.step_costs import read_table

        read_table(config.ddtree_step_costs)  # a bad table fails here, before the engine starts
    config.__dict__.update(ddtree=True, ddtree_max_budget=budget, ddtree_depth=depth, ddtree_policy=policy)


def _apply_engine_defaults() -> None:
    from vllm import envs
    from vllm.config import speculative
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.vllm import VllmConfig
    from vllm.logger import init_logger

    if getattr(VllmConfig, "_ddtree_patched", False):
        return
    log = init_logger("vllm.ddtree")  # a child of vLLM's logger: its level, handler, format, info_once
    slots = speculative.SpeculativeConfig.max_num_new_slots_for_drafting.fget
    use_v2 = VllmConfig.use_v2_model_runner.fget
    override_graphs = VllmConfig._maybe_override_dynamic_sd_cudagraph_mode
    post_init = VllmConfig.__post_init__

    def max_num_new_slots_for_drafting(self) -> int:
        # The scheduler keeps this many slots per request for the drafter's pass, which adds D query
        # rows per request (DFlash's K), whatever the tree budget B is.
        return self.ddtree_depth if is_ddtree(self) else slots(self)

    def use_v2_model_runner(self) -> bool:
        if not is_ddtree(self.speculative_config):
            return use_v2(self)
        if envs.VLLM_USE_V2_MODEL_RUNNER:
            raise ValueError('speculative_config method "ddtree" runs on the V1 model runner; unset '
                             "VLLM_USE_V2_MODEL_RUNNER (or set it to 0)")
        log.info_once("ddtree: using the V1 model runner (the tree verifier and KV commit hook into it)")
        return False

    @functools.wraps(override_graphs)
    def _maybe_override_dynamic_sd_cudagraph_mode(self, *args, **kwargs):
        override_graphs(self, *args, **kwargs)
        if not is_ddtree(self.speculative_config):
            return
        mode = self.compilation_config.cudagraph_mode
        if mode is not None and mode.has_full_cudagraphs():
            log.info("ddtree: cudagraph_mode %s -> PIECEWISE (tree attention is chosen per step outside the "
                     "captured graphs)", mode.name)
            self.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE

    @functools.wraps(post_init)
    def __post_init__(self, *args, **kwargs):
        if not is_ddtree(self.speculative_config):
            return post_init(self, *args, **kwargs)
        check_engine_settings(self, log)
        post_init(self, *args, **kwargs)
        passes = self.compilation_config.pass_config
        if getattr(passes, "fuse_attn_quant", False):
            log.info("ddtree: attention + quantization fusion off (the tree kernel writes unquantized outputs)")
            passes.fuse_attn_quant = False

    speculative.SpeculativeConfig.max_num_new_slots_for_drafting = property(max_num_new_slots_for_drafting)
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)
    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode = _maybe_override_dynamic_sd_cudagraph_mode
    VllmConfig.__post_init__ = __post_init__
    VllmConfig._ddtree_patched = True


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
