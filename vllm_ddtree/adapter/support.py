"""What targets and engine settings ddtree serves: every refusal's rule and message, in one place.

Target checks run twice, on two views of the same model: on its config when the speculative config
is built (:func:`check_target`, before any weight loads), and on each attention layer when the
engine hooks it (:func:`unsupported_layer_features`, at start, before any request). Engine settings
(:func:`check_engine_settings`) are checked when vLLM's engine config is built. Drafter checks live in
:mod:`vllm_ddtree.adapter.options`; request features in :mod:`vllm_ddtree.adapter.admission`.
"""

from __future__ import annotations

METHOD_NAME = 'speculative_config method "ddtree"'
USE_DFLASH = 'use method "dflash" with the same drafter'
UNQUANTIZED_KV = ("auto", "bfloat16", "float16", "float32")


def refusal(what: str, fix: str = USE_DFLASH) -> ValueError:
    return ValueError(f"{METHOD_NAME} does not support {what}; {fix}")


def check_target(model_config) -> None:
    """The target model's config, before anything loads."""
    hf = model_config.hf_text_config
    if getattr(model_config, "uses_mrope", False):
        raise refusal("M-RoPE targets (tree nodes need one position each: prefix + depth)")
    layer_types = getattr(hf, "layer_types", None) or []
    if getattr(model_config, "is_hybrid", False) or any(t not in ("full_attention", "attention") for t in layer_types):
        raise refusal("hybrid (Mamba/GDN/sliding-window) targets: their recurrent state or window cannot branch over "
                      "a tree")
    if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
        raise refusal("sliding-window attention targets")
    archs = " ".join(getattr(hf, "architectures", None) or [])
    if getattr(hf, "attn_logit_softcapping", None):
        raise refusal("targets with attention logit soft-capping (attn_logit_softcapping)")
    if getattr(hf, "alibi", False) or getattr(hf, "position_embedding_type", None) == "alibi" or \
            any(name in archs for name in ("Bloom", "MPT")):
        raise refusal("ALiBi-position targets")
    if "GptOss" in archs:
        raise refusal("attention-sink targets (gpt-oss)")


def check_kv_cache_dtype(dtype) -> None:
    if str(dtype) not in UNQUANTIZED_KV:
        raise refusal(f"a quantized KV cache (kv_cache_dtype {str(dtype)!r})", 'use kv_cache_dtype "auto"')


def unsupported_layer_features(impl) -> list[str]:
    """What of one target attention layer (its vLLM ``impl``) the tree kernel cannot compute."""
    from vllm.v1.attention.backend import AttentionType

    found = []
    if getattr(impl, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
        found.append(f"{impl.attn_type} attention")
    if getattr(impl, "alibi_slopes", None) is not None:
        found.append("ALiBi")
    if getattr(impl, "logits_soft_cap", None):
        found.append("logit soft-capping")
    if getattr(impl, "sinks", None) is not None:
        found.append("attention sinks")
    if getattr(impl, "sliding_window", None) not in (None, (-1, -1)):
        found.append("sliding-window attention")
    if str(getattr(impl, "kv_cache_dtype", "auto")) not in UNQUANTIZED_KV:
        found.append(f"KV cache dtype {impl.kv_cache_dtype!r}")
    return found


def check_engine_settings(vllm_config, log) -> None:
    """Engine settings, on vLLM's engine config before it resolves its defaults: refuses the ones
    ddtree cannot run under when asked for explicitly, and turns off, with a log line, the defaults
    that would turn them on."""
    scheduler = vllm_config.scheduler_config
    if scheduler.async_scheduling:
        raise refusal("async scheduling (the verifier and the KV commit run in the step they verify)",
                      "remove async_scheduling / --async-scheduling")
    if scheduler.async_scheduling is None:
        log.info("ddtree: async scheduling off (the tree verifier and KV commit are synchronous with the step)")
        scheduler.async_scheduling = False
    check_parallel_settings(vllm_config.parallel_config, getattr(vllm_config.model_config, "is_moe", False))
    check_kv_cache_dtype(vllm_config.cache_config.cache_dtype)
    if getattr(vllm_config.model_config, "logits_processors", None):
        raise refusal("custom logits processors (logits_processors: the tree verifier applies vLLM's own logits "
                      "processing at every node, with the node's path as history, and cannot apply a custom one "
                      "there)", f"remove logits_processors, or {USE_DFLASH}")


def check_parallel_settings(parallel, moe_target: bool) -> None:
    """The parallel layouts ddtree serves: tensor parallelism (dense and MoE targets), and data
    parallelism for dense targets (vLLM runs those ranks as independent engines). The others are
    refused before the engine starts."""
    use_tp = "use tensor_parallel_size within a node and independent replicas across nodes"
    if parallel.pipeline_parallel_size > 1:
        raise refusal(f"pipeline parallelism (pipeline_parallel_size {parallel.pipeline_parallel_size}: every "
                      "stage holds its own layers' KV, and the tree's KV commit runs with the verifier, in the "
                      "last stage)", f"set pipeline_parallel_size to 1 and {use_tp}")
    for name, what in (("decode_context_parallel_size", "decode"), ("prefill_context_parallel_size", "prefill")):
        size = getattr(parallel, name, 1)
        if size > 1:
            raise refusal(f"{what} context parallelism ({name} {size}: ranks split a request's tokens or KV "
                          "cache, while the tree kernel and the KV commit work on a request's whole KV cache on one "
                          "rank)", f"set {name} to 1 and {use_tp}")
    if parallel.enable_dbo or getattr(parallel, "ubatch_size", 0) > 1:
        raise refusal("micro-batching (enable_dbo / ubatch_size: each micro-batch would need its own tree "
                      "metadata)", "remove enable_dbo and ubatch_size")
    if parallel.enable_expert_parallel:
        raise refusal("expert parallelism (enable_expert_parallel: not tested with ddtree yet; vLLM's CPU build "
                      "cannot run it)", "remove enable_expert_parallel: MoE targets run sharded by tensor "
                      "parallelism (tested)")
    if parallel.data_parallel_size > 1 and moe_target:
        raise refusal(f"data parallelism with a MoE target (data_parallel_size {parallel.data_parallel_size}: "
                      "vLLM runs such ranks in lockstep, and each rank's tree steps, drafter passes and probes "
                      "follow its own requests)",
                      "use tensor_parallel_size with enable_expert_parallel within a node, and independent "
                      "replicas across nodes")


def check_v2_settings(vllm_config) -> None:
    """Engine settings ddtree does not serve on the V2 runner, refused before the engine starts."""
    if getattr(vllm_config.speculative_config, "enable_adaptive_verification", False):
        raise refusal("adaptive verification (enable_adaptive_verification: V2 would reallocate each request's "
                      "drafts as a chain's)", "remove enable_adaptive_verification")
    if getattr(vllm_config, "watermark_config", None) is not None:
        raise refusal("watermarking (watermark_config: V2's watermark sampler reads drafts as a chain)",
                      "remove watermark_config")
