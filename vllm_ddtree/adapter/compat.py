"""What the adapter needs of vLLM, checked before anything is patched, and what differs between the
vLLM releases it serves: the one place that knows them.

Every vLLM name the adapter patches (:mod:`vllm_ddtree.adapter.patching` refuses to patch one that
is not listed here), subclasses, calls or stands in for is listed with the parameter names it has in
the releases this one was written against, in one table per part of the adapter:

=================  ==========================================================================
``FRONT_DOOR``     0.32/0.33: "ddtree" added to vLLM's closed method list (``config``)
``CUSTOM_METHOD``  0.34: "ddtree" registered as a custom speculative method (``custom_method``)
``REQUESTS``       request admission (``admission``), every release
``SCHEDULER``      the scheduler's side of structured outputs (``structured_outputs``), per release
``V1_RUNNER``      the V1 model runner, its drafter and structured outputs (0.32/0.33; gone in 0.34)
``V2_RUNNER``      Model Runner V2 (0.32-0.34: where a signature changed, each release's is listed;
                   run on 0.32.0 and 0.34.0, read against the 0.33.0 source)
``ATTENTION``      the attention backends' ``impl.forward`` the tree attention hooks
=================  ==========================================================================

:func:`incompatibilities` compares the tables of the installed release (:func:`tables`) with the
vLLM that is installed; any difference (a missing name, a renamed or added parameter) means that
vLLM changed code we hook, and the plugin then patches nothing but the refusal of
``"method": "ddtree"`` (see :mod:`vllm_ddtree.plugin`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect


PROPERTY = "property"  # the name must be a property, not a function

# dotted path -> the parameter names its signature must have (a list: one of them), or PROPERTY, or
# None (only present).
Table = dict[str, tuple[str, ...] | list[tuple[str, ...]] | str | None]

FRONT_DOOR: Table = {  # config.py, 0.32/0.33
    "vllm.config.speculative.SpeculativeConfig.__post_init__": ("self",),
    "vllm.config.speculative.SpeculativeConfig.method": None,  # its type widened by "ddtree"
    "vllm.config.speculative.SpeculativeConfig.num_speculative_tokens": None,  # D while the drafter is built
    "vllm.config.speculative.SpeculativeConfig.max_num_new_slots_for_drafting": PROPERTY,
    "vllm.config.speculative.SpeculativeMethod": None,
    "vllm.config.vllm.VllmConfig.__post_init__": ("self",),
    "vllm.config.vllm.VllmConfig.use_v2_model_runner": PROPERTY,  # read: which runner an engine gets
    "vllm.config.vllm.VllmConfig._maybe_override_dynamic_sd_cudagraph_mode": ("self",),
}

CUSTOM_METHOD: Table = {  # custom_method.py, 0.34
    "vllm.v1.worker.gpu.spec_decode.speculator_config.register_speculative_method": ("name", "config_cls"),
    "vllm.v1.worker.gpu.spec_decode.dflash.config.DFlashSpeculatorConfig.configure": ("cls", "spec"),
    "vllm.v1.worker.gpu.spec_decode.dflash.config.DFlashSpeculatorConfig.num_lookahead_tokens": PROPERTY,
    "vllm.v1.worker.gpu.spec_decode.dflash.config.DFlashSpeculatorConfig.max_num_draft_seqs": (
        "self", "max_num_batched_tokens"),
    "vllm.v1.worker.gpu.spec_decode.dflash.config.DFlashSpeculatorConfig.hash_factors": ("self",),
    "vllm.config.speculative.SpeculativeConfig.speculator_options": None,
    "vllm.config.vllm.VllmConfig.__post_init__": ("self",),
}

REQUESTS: Table = {  # admission.py, step_layout.py
    "vllm.v1.engine.input_processor.InputProcessor.__init__": ("self", "vllm_config", "renderer", "mm_registry"),
    "vllm.v1.engine.input_processor.InputProcessor._validate_params": ("self", "params", "supported_tasks"),
    "vllm.utils.torch_utils.async_tensor_h2d": ("data", "device", "dtype", "out"),
}

V1_RUNNER: Table = {  # v1_runner.py, drafter.py, structured_outputs.py, step_costs.py, verifier.py (0.32/0.33)
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
    "vllm.v1.spec_decode.dflash.DFlashProposer.__init__": ("self", "vllm_config", "device", "runner"),
    "vllm.v1.spec_decode.dflash.DFlashProposer.propose": (
        "self", "num_speculative_tokens", "target_token_ids", "target_positions", "target_hidden_states",
        "next_token_ids", "token_indices_to_sample", "common_attn_metadata", "sampling_metadata",
        "mm_embed_inputs", "num_rejected_tokens_gpu", "slot_mappings"),
    "vllm.v1.spec_decode.dflash.DFlashProposer._sample_draft_tokens": (
        "self", "hidden_states", "sampling_metadata"),
    "vllm.v1.spec_decode.dflash.DFlashProposer.prepare_next_token_ids_padded": (
        "self", "sampled_token_ids", "requests", "gpu_input_batch", "discard_request_mask"),
}

_SCHEDULER: Table = {  # structured_outputs.py: the scheduler's side of structured outputs, every release
    "vllm.v1.outputs.DraftTokenIds": ("req_ids", "draft_token_ids"),
    "vllm.v1.core.sched.scheduler.Scheduler.__init__": (
        "self", "vllm_config", "kv_cache_config", "structured_output_manager", "block_size", "hash_block_size",
        "mm_registry", "include_finished_set", "log_stats"),
    "vllm.v1.core.sched.scheduler.Scheduler.update_draft_token_ids": ("self", "draft_token_ids"),
    "vllm.v1.structured_output.StructuredOutputManager.grammar_bitmask": (
        "self", "requests", "structured_output_request_ids", "scheduled_spec_decode_tokens"),
    "vllm.v1.structured_output.StructuredOutputManager._fill_bitmasks": ("self", "batch"),
}

# Where the scheduler checks a request's drafts against its grammar, and how a bitmask row is filled:
# 0.32/0.33 validate_tokens (the valid prefix), rows (grammar, row, constrain), one block of 1 + drafts
# rows a request; 0.34 trim_spec_tokens (the kept drafts), rows (grammar, row, constrain, masked ids),
# one block of 1 + num_speculative_tokens rows a request.
SCHEDULER: Table = {**_SCHEDULER, "vllm.v1.structured_output.StructuredOutputManager.validate_tokens": (
    "self", "request", "spec_tokens")}
SCHEDULER_034: Table = {**_SCHEDULER, "vllm.v1.structured_output.StructuredOutputManager.trim_spec_tokens": (
    "self", "request", "spec_tokens")}


def grammar_check_name() -> str:
    """The ``StructuredOutputManager`` method through which the scheduler checks drafts."""
    return "trim_spec_tokens" if has_custom_methods() else "validate_tokens"


def grammar_row(grammar, row: int, constrain: bool) -> tuple:
    """One entry of ``StructuredOutputManager._fill_bitmasks``'s batch."""
    return (grammar, row, constrain, ()) if has_custom_methods() else (grammar, row, constrain)


def grammar_rows_per_request(vllm_config, num_scheduled: int) -> int:
    """The bitmask rows a structured request's block takes (its root's, then its drafts')."""
    return 1 + (vllm_config.num_speculative_tokens if has_custom_methods() else num_scheduled)


V2_RUNNER: Table = {  # v2_runner.py, v2_drafter.py, verifier.py's V2TreeVerifier
    "vllm.v1.worker.gpu.model_runner.init_speculator": None,  # swapped while a ddtree runner is built
    "vllm.config.speculative.SpeculativeConfig.num_speculative_tokens": None,  # D while the drafter is built
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner.__init__": ("self", "vllm_config", "device"),
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner.load_model": (
        "self", "load_dummy_weights", "args", "model", "kwargs"),
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner.initialize_kv_cache": [
        ("self", "kv_cache_config", "is_profiling", "kv_cache_allocation_context"),  # 0.32/0.33
        ("self", "kv_cache_config", "is_profiling", "kv_cache_allocation_context", "extensible")],  # 0.34
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner._dummy_sampler_run": ("self", "hidden_states"),
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_attn": ("self", "input_batch"),
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner.take_draft_token_ids": ("self",),
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner._dummy_run": (  # timed for the cost-aware budget
        "self", "num_tokens", "args", "skip_attn", "uniform_decode", "context_len", "skip_eplb", "is_profile",
        "valid_dummy_state_slots", "randomize_inputs", "kwargs"),
    "vllm.v1.worker.gpu.model_states.default.DefaultModelState.prepare_attn": (
        "self", "input_batch", "cudagraph_mode", "block_tables", "slot_mappings", "attn_groups", "kv_cache_config",
        "for_capture", "ubatch_idx", "model_specific_attn_metadata"),
    "vllm.v1.worker.gpu.spec_decode.rejection_sampler.RejectionSampler.__call__": [
        ("self", "logits", "input_batch", "draft_logits", "invalid_drafts"),  # 0.32/0.33
        ("self", "logits", "input_batch", "draft_logits")],  # 0.34
    "vllm.v1.worker.gpu.spec_decode.dflash.speculator.DFlashSpeculator.__init__": ("self", "vllm_config", "device"),
    "vllm.v1.worker.gpu.spec_decode.dflash.speculator.DFlashSpeculator.propose": (
        "self", "input_batch", "attn_metadata", "slot_mappings", "last_hidden_states", "aux_hidden_states",
        "num_sampled", "num_rejected", "last_sampled", "next_prefill_tokens", "temperature", "seeds", "dp_sync_state",
        "dummy_run", "skip_attn_for_dummy_run", "mm_inputs", "is_profile", "num_speculative_tokens"),
    "vllm.v1.worker.gpu.spec_decode.dflash.speculator.DFlashSpeculator._generate_draft": (
        "self", "num_reqs", "num_tokens_padded", "attn_metadata", "slot_mappings", "num_tokens_across_dp",
        "cudagraph_runtime_mode"),
    "vllm.v1.worker.gpu.spec_decode.dflash.speculator.DFlashSpeculator._run_model": (
        "self", "num_tokens", "attn_metadata", "slot_mappings", "num_tokens_across_dp", "cudagraph_runtime_mode"),
    "vllm.v1.worker.gpu.input_batch.get_num_sampled_and_rejected": (
        "num_sampled", "seq_lens", "cu_num_logits", "idx_mapping", "prefill_len"),
    # the verifier's node processing and logprobs (verifier.py, logits_processing.py): V2's sampler states
    "vllm.v1.worker.gpu.sample.sampler.Sampler.add_request": ("self", "req_idx", "sampling_params"),
    "vllm.v1.worker.gpu.sample.sampler.Sampler.get_logprobs_dims": [
        ("self", "idx_mapping_np", "include_token_ids"),  # 0.32/0.33
        ("self", "idx_mapping_np")],  # 0.34
    "vllm.v1.worker.gpu.sample.states.SamplingStates.apply_temperature": (
        "self", "logits", "expanded_idx_mapping", "idx_mapping_np"),
    "vllm.v1.worker.gpu.sample.states.SamplingStates.apply_top_k_top_p": (
        "self", "logits", "expanded_idx_mapping", "idx_mapping_np"),
    "vllm.v1.worker.gpu.sample.logprob.compute_topk_scores": (
        "logits", "num_logprobs", "sampled_token_ids", "cu_num_logits", "logprob_token_ids_state",
        "expanded_idx_mapping", "max_per_req_token_ids", "logits_mode"),
    "vllm.v1.worker.gpu.metrics.logits.get_num_nans": ("logits",),
    # read by attribute: allowed/stop tokens and min lengths; output counts, prompt bits and penalties;
    # the number of bad words
    "vllm.v1.worker.gpu.sample.logit_bias.LogitBiasState.__init__": ("self", "vllm_config", "req_states"),
    "vllm.v1.worker.gpu.sample.penalties.PenaltiesState.__init__": ("self", "vllm_config", "req_states"),
    "vllm.v1.worker.gpu.sample.bad_words.BadWordsState.__init__": ("self", "vllm_config", "req_states"),
    "vllm.v1.worker.gpu.sample.output.SamplerOutput.__init__": (
        "self", "sampled_token_ids", "logprobs_tensors", "num_nans", "num_sampled", "num_rejected",
        "sampling_mask_tensors"),
}

ATTENTION: Table = {  # attention/cpu.py, attention/gpu.py
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

# Every name of every table: what the patching module accepts.
REQUIRED: Table = {**FRONT_DOOR, **CUSTOM_METHOD, **REQUESTS, **SCHEDULER, **SCHEDULER_034, **V1_RUNNER, **V2_RUNNER,
                   **ATTENTION}


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
    alternatives = expected if isinstance(expected, list) else [expected]
    if params not in alternatives:
        return f"{path} takes ({', '.join(params)}), ddtree hooks ({' or '.join(', '.join(a) for a in alternatives)})"
    return None


@functools.cache  # the installed vLLM does not change; the scheduler asks for every grammar row
def has_custom_methods() -> bool:
    """Whether the installed vLLM offers the custom speculative-method interface (0.34+), where it
    has only Model Runner V2."""
    return importlib.util.find_spec("vllm.v1.worker.gpu.spec_decode.speculator_config") is not None


def tables(custom_methods: bool | None = None) -> dict[str, Table]:
    """The tables a release must match (by default the installed one's): 0.34+, which has the
    custom-method interface, the custom method and V2; 0.32/0.33 the front door and both runners."""
    if has_custom_methods() if custom_methods is None else custom_methods:
        return {"CUSTOM_METHOD": CUSTOM_METHOD, "REQUESTS": REQUESTS, "SCHEDULER": SCHEDULER_034,
                "V2_RUNNER": V2_RUNNER, "ATTENTION": ATTENTION}
    return {"FRONT_DOOR": FRONT_DOOR, "REQUESTS": REQUESTS, "SCHEDULER": SCHEDULER, "V1_RUNNER": V1_RUNNER,
            "V2_RUNNER": V2_RUNNER, "ATTENTION": ATTENTION}


def incompatibilities(required: dict | None = None) -> list[str]:
    """Every difference between the installed vLLM and ``required`` (by default the installed
    release's tables), as readable lines."""
    if required is None:
        required = {path: expected for table in tables().values() for path, expected in table.items()}
    return [why for path, expected in required.items() if (why := mismatch(path, expected)) is not None]


def uses_v2_runner(vllm_config) -> bool:
    """Whether an engine runs vLLM's Model Runner V2 (0.34 has no other)."""
    return getattr(vllm_config, "use_v2_model_runner", True)


def config_front_door_works() -> bool:
    """Whether ``"method": "ddtree"`` can at least be recognised (and refused with our message)."""
    if has_custom_methods():
        return not incompatibilities({path: CUSTOM_METHOD[path] for path in CUSTOM_METHOD
                                      if path.endswith("register_speculative_method")})
    return not incompatibilities({path: expected for path, expected in FRONT_DOOR.items()
                                  if path.startswith("vllm.config.speculative.")})
