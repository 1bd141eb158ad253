"""``method: "ddtree"`` in vLLM's ``SpeculativeConfig``.

vLLM's method field is a closed ``Literal`` and every DFlash code path keys on ``method == "dflash"``.
A ddtree config is therefore built as a dflash config (same drafter loading, aux hidden states, draft
KV cache) and marked with plain instance attributes: ``ddtree`` (True), ``ddtree_budget`` (B, the
``num_speculative_tokens`` the user gave) and ``ddtree_depth`` (D = drafter block size - 1). Plain
attributes survive the pickling that ships configs to the engine and worker processes, and no class of
ours has to be importable there before the plugin loads.

A ddtree engine also gets, in ``VllmConfig``: the V1 model runner (our runner hooks are written for
it; V2 comes later), and on GPUs piecewise CUDA graphs instead of full ones (the tree-attention hook
decides per step in eager Python, outside the captured pieces). Both are logged when they apply.
"""

from __future__ import annotations

import typing

from vllm_ddtree.adapter.options import check_budget, drafter_depth

METHOD = "ddtree"


def is_ddtree(speculative_config) -> bool:
    return bool(speculative_config is not None and speculative_config.__dict__.get("ddtree", False))


def required_internals():
    """(what, present?) for every vLLM internal this module patches."""
    from vllm.config import speculative, vllm as vllm_config

    cls = speculative.SpeculativeConfig
    engine = vllm_config.VllmConfig
    return [
        ("vllm.config.vllm.VllmConfig.use_v2_model_runner (property)",
         isinstance(getattr(engine, "use_v2_model_runner", None), property)),
        ("vllm.config.vllm.VllmConfig._maybe_override_dynamic_sd_cudagraph_mode",
         hasattr(engine, "_maybe_override_dynamic_sd_cudagraph_mode")),
        ("vllm.config.speculative.SpeculativeConfig.__post_init__", hasattr(cls, "__post_init__")),
        ("SpeculativeConfig field 'method'", "method" in getattr(cls, "__dataclass_fields__", {})),
        ("SpeculativeConfig.max_num_new_slots_for_drafting", isinstance(
            getattr(cls, "max_num_new_slots_for_drafting", None), property)),
        ("'dflash' in the method Literal", "dflash" in _literal_values(getattr(speculative, "SpeculativeMethod", None))),
    ]


def apply() -> None:
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config import speculative

    cls = speculative.SpeculativeConfig
    if getattr(cls, "_ddtree_patched", False):
        return
    widened = typing.Optional[typing.Literal[tuple(_literal_values(speculative.SpeculativeMethod)) + (METHOD,)]]
    cls.__annotations__["method"] = widened
    cls.__dataclass_fields__["method"].type = widened
    original = cls.__post_init__

    def __post_init__(self):
        if self.method != METHOD:
            return original(self)
        budget = check_budget(self.num_speculative_tokens)
        _refuse_unsupported_platform()
        depth_hint = _precheck_local_drafter(self.model)
        self.method = "dflash"
        original(self)
        target = self.target_model_config
        depth = drafter_depth(self.draft_model_config.hf_config, target.get_total_num_hidden_layers(),
                              target.get_hidden_size(), target.get_vocab_size(), depth_hint)
        _refuse_unsupported_target(target)
        self.__dict__.update(ddtree=True, ddtree_budget=budget, ddtree_depth=depth)

    cls.__post_init__ = __post_init__
    slots = cls.max_num_new_slots_for_drafting.fget

    def max_num_new_slots_for_drafting(self) -> int:
        # The scheduler keeps this many slots per request for the drafter's pass, which adds D query
        # rows per request (DFlash's K), whatever the tree budget B is.
        return self.ddtree_depth if is_ddtree(self) else slots(self)

    cls.max_num_new_slots_for_drafting = property(max_num_new_slots_for_drafting)
    rebuild_dataclass(cls, force=True)
    cls._ddtree_patched = True
    _apply_engine_defaults()


def _apply_engine_defaults() -> None:
    from vllm import envs
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.vllm import VllmConfig
    from vllm.logger import init_logger

    log = init_logger("vllm_ddtree")  # vLLM's logger: its info_once, its format
    use_v2 = VllmConfig.use_v2_model_runner.fget
    override_graphs = VllmConfig._maybe_override_dynamic_sd_cudagraph_mode

    def use_v2_model_runner(self) -> bool:
        if not is_ddtree(self.speculative_config):
            return use_v2(self)
        if envs.VLLM_USE_V2_MODEL_RUNNER:
            raise ValueError('speculative_config method "ddtree" runs on the V1 model runner; unset '
                             "VLLM_USE_V2_MODEL_RUNNER (or set it to 0)")
        log.info_once("ddtree: using the V1 model runner (the tree verifier and KV commit hook into it)")
        return False

    def _maybe_override_dynamic_sd_cudagraph_mode(self) -> None:
        override_graphs(self)
        if not is_ddtree(self.speculative_config):
            return
        _refuse_unsupported_cache(self.cache_config)
        mode = self.compilation_config.cudagraph_mode
        if mode is not None and mode.has_full_cudagraphs():
            log.info("ddtree: cudagraph_mode %s -> PIECEWISE (tree attention is chosen per step outside the "
                     "captured graphs)", mode.name)
            self.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE

    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)
    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode = _maybe_override_dynamic_sd_cudagraph_mode


def _refuse_unsupported_platform() -> None:
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise ValueError(f'speculative_config method "ddtree" runs on NVIDIA GPUs and vLLM\'s CPU backend; '
                         f"{current_platform.device_name!r} is not supported yet. Use method \"dflash\" with the "
                         "same drafter on this platform.")


def _precheck_local_drafter(model) -> int | None:
    """Refuses a local non-DFlash checkpoint before vLLM tries (and fails obscurely) to load it as one.

    Returns the tree depth a ``speculators``-format DFlash drafter declares (vLLM converts that format
    itself, renumbering its layer ids, but drops the block size), else None.
    """
    import json
    import os

    path = os.path.join(model, "config.json") if isinstance(model, str) else None
    if path is None or not os.path.isfile(path):
        if model is None:
            raise ValueError('speculative_config method "ddtree" needs "model": a DFlash drafter checkpoint')
        return None
    with open(path) as f:
        config = json.load(f)
    kind = config.get("speculators_model_type")
    if kind is not None:
        if kind != "dflash":
            raise ValueError(f'speculative_config method "ddtree" needs a DFlash drafter; {model} is a '
                             f'speculators "{kind}" checkpoint')
        layer_config = config.get("transformer_layer_config") or {}
        block_size = config.get("block_size") or layer_config.get("block_size")
        if block_size:
            return int(block_size) - 1
        methods = (config.get("speculators_config") or {}).get("proposal_methods") or [{}]
        return methods[0].get("speculative_tokens")
    archs = config.get("architectures") or []
    if not any("DFlash" in a for a in archs):
        raise ValueError(f'speculative_config method "ddtree" needs a DFlash drafter (z-lab checkpoint format, '
                         f'architectures ["DFlashDraftModel"]); {model} has architectures {archs}')
    return None


def _refuse_unsupported_target(target) -> None:
    hf = target.hf_text_config
    if getattr(target, "uses_mrope", False):
        raise ValueError('speculative_config method "ddtree" does not support M-RoPE targets: tree nodes need '
                         "one position each (prefix + depth)")
    layer_types = getattr(hf, "layer_types", None) or []
    if getattr(target, "is_hybrid", False) or any(t not in ("full_attention", "attention") for t in layer_types):
        raise ValueError('speculative_config method "ddtree" does not support hybrid (Mamba/GDN/sliding-window) '
                         "targets: their recurrent state or window cannot branch over a tree")
    if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
        raise ValueError('speculative_config method "ddtree" does not support sliding-window attention targets')
    # What the tree-attention kernel does not compute (the GPU hook re-checks each layer).
    archs = " ".join(getattr(hf, "architectures", None) or [])
    if getattr(hf, "attn_logit_softcapping", None):
        raise ValueError('speculative_config method "ddtree" does not support targets with attention logit '
                         "soft-capping (attn_logit_softcapping)")
    if getattr(hf, "alibi", False) or getattr(hf, "position_embedding_type", None) == "alibi" or \
            any(name in archs for name in ("Bloom", "MPT")):
        raise ValueError('speculative_config method "ddtree" does not support ALiBi-position targets')
    if "GptOss" in archs:
        raise ValueError('speculative_config method "ddtree" does not support attention-sink targets (gpt-oss)')


def _refuse_unsupported_cache(cache_config) -> None:
    dtype = str(getattr(cache_config, "cache_dtype", "auto"))
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ValueError(f'speculative_config method "ddtree" needs an unquantized KV cache; kv_cache_dtype '
                         f'{dtype!r} is not supported: use "auto"')


def _literal_values(tp) -> tuple:
    """All strings of a (possibly nested) Literal / Union of Literals."""
    if tp is None:
        return ()
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return tuple(a for a in args if isinstance(a, str))
    return tuple(v for a in args for v in _literal_values(a))
