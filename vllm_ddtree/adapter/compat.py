"""What the adapter needs of vLLM, checked before anything is patched.

Every vLLM name the adapter patches (:mod:`vllm_ddtree.adapter.patching` refuses to patch one that
is not listed here), subclasses, calls or stands in for is listed with the parameter names it had in
the vLLM versions this release was written against (0.32 and 0.33: identical for all of them).
:func:`incompatibilities` compares them with the vLLM that is installed; any difference (a missing
name, a renamed or added parameter) means that vLLM changed code we hook, and the plugin then
patches nothing but the refusal of ``"method": "ddtree"`` (see :mod:`vllm_ddtree.plugin`).
"""

from __future__ import annotations

import importlib
import inspect


PROPERTY = "property"  # the name must be a property, not a function

# dotted path -> the parameter names its signature must have (or PROPERTY, or None: only present).
REQUIRED: dict[str, tuple[str, ...] | str | None] = {
    # config front door (config.py)
    "vllm.config.speculative.SpeculativeConfig.__post_init__": ("self",),
    "vllm.config.speculative.SpeculativeConfig.method": None,  # its type widened by "ddtree"
    "vllm.config.speculative.SpeculativeConfig.num_speculative_tokens": None,  # D while the drafter is built
    "vllm.config.speculative.SpeculativeConfig.max_num_new_slots_for_drafting": PROPERTY,
    "vllm.config.speculative.SpeculativeMethod": None,
    "vllm.config.vllm.VllmConfig.__post_init__": ("self",),
    "vllm.config.vllm.VllmConfig.use_v2_model_runner": PROPERTY,
    "vllm.config.vllm.VllmConfig._maybe_override_dynamic_sd_cudagraph_mode": ("self",),
    # request admission (admission.py)
    "vllm.v1.engine.input_processor.InputProcessor.__init__": ("self", "vllm_config", "renderer", "mm_registry"),
    "vllm.v1.engine.input_processor.InputProcessor._validate_params": ("self", "params", "supported_tasks"),
    # the V1 runner (v1_runner.py, drafter.py)
    "vllm.v1.worker.gpu_model_runner.DFlashProposer": None,
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.__init__": ("self", "vllm_config", "device"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs": (
        "self", "scheduler_output", "num_scheduled_tokens"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata": (
        "self", "num_tokens", "num_reqs", "max_query_len", "num_tokens_padded", "num_reqs_padded", "ubatch_slices",
        "logits_indices", "max_num_sampled_tokens", "use_spec_decode", "for_cudagraph_capture",
        "num_scheduled_tokens", "slot_mappings"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.initialize_kv_cache": (
        "self", "kv_cache_config", "is_profiling", "kv_cache_allocation_context"),
    "vllm.v1.worker.cpu_model_runner.CPUModelRunner.initialize_kv_cache": (  # the CPU runner's own
        "self", "kv_cache_config", "is_profiling", "kv_cache_allocation_context"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._dummy_sampler_run": ("self", "hidden_states"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_draft_token_ids_cpu": ("self",),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.take_draft_token_ids": ("self",),
    # structured outputs (structured_outputs.py)
    "vllm.v1.outputs.DraftTokenIds": ("req_ids", "draft_token_ids"),
    "vllm.v1.core.sched.scheduler.Scheduler.__init__": (
        "self", "vllm_config", "kv_cache_config", "structured_output_manager", "block_size", "hash_block_size",
        "mm_registry", "include_finished_set", "log_stats"),
    "vllm.v1.core.sched.scheduler.Scheduler.update_draft_token_ids": ("self", "draft_token_ids"),
    "vllm.v1.structured_output.StructuredOutputManager.validate_tokens": ("self", "request", "spec_tokens"),
    "vllm.v1.structured_output.StructuredOutputManager.grammar_bitmask": (
        "self", "requests", "structured_output_request_ids", "scheduled_spec_decode_tokens"),
    "vllm.v1.structured_output.StructuredOutputManager._fill_bitmasks": ("self", "batch"),
    # timed for the cost-aware budget's step costs (step_costs.py); the verifier (verifier.py)
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._dummy_run": (
        "self", "num_tokens", "cudagraph_runtime_mode", "force_attention", "uniform_decode", "allow_microbatching",
        "skip_eplb", "is_profile", "create_mixed_batch", "remove_lora", "is_graph_capturing", "num_active_loras",
        "profile_seq_lens", "randomize_inputs"),
    "vllm.model_executor.models.qwen3_dflash.DFlashQwen3ForCausalLM.precompute_and_store_context_kv": (
        "self", "context_states", "context_positions", "context_slot_mapping"),
    "vllm.model_executor.models.qwen3_dflash.DFlashQwen3ForCausalLM.combine_hidden_states": ("self", "hidden_states"),
    "vllm.v1.spec_decode.dflash.DFlashProposer.dummy_run": (
        "self", "num_tokens", "use_cudagraphs", "is_graph_capturing", "slot_mappings"),
    "vllm.v1.sample.rejection_sampler.RejectionSampler.forward": (
        "self", "metadata", "draft_probs", "logits", "sampling_metadata"),
    "vllm.v1.sample.sampler.Sampler.compute_logprobs": ("logits",),
    "vllm.v1.sample.sampler.Sampler.gather_logprobs": ("logprobs", "num_logprobs", "token_ids"),
    "vllm.utils.torch_utils.async_tensor_h2d": ("data", "device", "dtype", "out"),
    # the drafter (drafter.py)
    "vllm.v1.spec_decode.dflash.DFlashProposer.__init__": ("self", "vllm_config", "device", "runner"),
    "vllm.v1.spec_decode.dflash.DFlashProposer.propose": (
        "self", "num_speculative_tokens", "target_token_ids", "target_positions", "target_hidden_states",
        "next_token_ids", "token_indices_to_sample", "common_attn_metadata", "sampling_metadata",
        "mm_embed_inputs", "num_rejected_tokens_gpu", "slot_mappings"),
    "vllm.v1.spec_decode.dflash.DFlashProposer._sample_draft_tokens": (
        "self", "hidden_states", "sampling_metadata"),
    # attention (attention/cpu.py, attention/gpu.py)
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward": (
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
        "output_block_scale"),
    "vllm.v1.attention.backends.flash_attn.FlashAttentionImpl.forward": (
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
        "output_block_scale"),
    "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl.forward": (
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
        "output_block_scale"),
}


def resolve(path: str):
    """The object at a dotted path (module, then attributes); raises LookupError if absent."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            if attr not in _namespace(obj):
                raise LookupError(path)
            obj = _namespace(obj)[attr]
        return obj
    raise LookupError(path)


def _namespace(obj) -> dict:
    """Attributes as defined (class dicts along the MRO), so a property is seen as a property."""
    if isinstance(obj, type):
        merged = {}
        for klass in reversed(obj.__mro__):
            merged.update(vars(klass))
        return merged
    return vars(obj)


def mismatch(path: str, expected) -> str | None:
    """Why the installed vLLM's ``path`` differs from what the adapter hooks, or None."""
    try:
        obj = resolve(path)
    except LookupError:
        return f"{path} is missing"
    if expected is None:
        return None
    if expected == PROPERTY:
        return None if isinstance(obj, property) else f"{path} is no longer a property"
    func = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
    try:
        params = tuple(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return f"{path} has no readable signature"
    if params != expected:
        return f"{path} takes ({', '.join(params)}), ddtree hooks ({', '.join(expected)})"
    return None


def incompatibilities(required: dict | None = None) -> list[str]:
    """Every difference between the installed vLLM and :data:`REQUIRED`, as readable lines."""
    return [why for path, expected in (required or REQUIRED).items()
            if (why := mismatch(path, expected)) is not None]


def config_front_door_works() -> bool:
    """Whether ``"method": "ddtree"`` can at least be recognised (and refused with our message)."""
    return not incompatibilities({path: expected for path, expected in REQUIRED.items()
                                  if path.startswith("vllm.config.speculative.")})
