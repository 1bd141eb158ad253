"""What ddtree cannot serve is refused with a message that names the fix: request features on
arrival, configs, drafters, targets and engine settings before the engine starts."""

import os

import pytest
from tiny_engines import FREE_ROWS, PROMPTS, generate, run, structured
from tiny_models import write_dflash_drafter
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError


@pytest.mark.parametrize("params,message", [
    (SamplingParams(max_tokens=4, min_p=0.1), "min_p .* not yet supported with speculative decoding"),  # vLLM's own
])
def test_unsupported_request_features_are_refused_on_arrival(models, params, message):
    def refused(llm):
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate(["alpha"], params, use_tqdm=False)

    # The engine survives the refusal and keeps serving.
    result = run(models, ["alpha"], spec={"method": "ddtree", "num_speculative_tokens": 4}, before=refused)
    assert len(result.tokens[0][0]) == 40


def test_structured_outputs_with_a_reasoning_parser_are_refused_on_arrival(models):
    def refused(llm):
        with pytest.raises(VLLMValidationError, match="structured outputs on an engine with a reasoning parser"):
            llm.generate(["alpha"], SamplingParams(max_tokens=4, structured_outputs=structured("regex")),
                         use_tqdm=False)

    result = run(models, ["alpha"], spec={"method": "ddtree", "num_speculative_tokens": 4}, before=refused,
                 structured_outputs_config={"reasoning_parser": "deepseek_r1"})
    assert len(result.tokens[0][0]) == 40


@pytest.mark.parametrize("spec,message", [
    ({"method": "ddtree"}, "needs \"num_speculative_tokens\""),
    ({"method": "ddtree", "num_speculative_tokens": 8, "ddtree_budget": "greedy"}, "ddtree_budget"),
    ({"method": "ddtree", "num_speculative_tokens": 8, "ddtree_step_costs": {"step": {"1": 1.0}}},
     "must be a JSON file or a dict"),
    ({"method": "ddtree", "num_speculative_tokens": 8, "ddtree_budget": "fixed", "ddtree_step_costs": FREE_ROWS},
     "drop it, or drop \"ddtree_budget\": \"fixed\""),
    ({"method": "dflash", "num_speculative_tokens": 8, "ddtree_budget": "fixed"},
     "keys \\['ddtree_budget'\\] belong to method \"ddtree\""),
    ({"method": "ddtree", "num_speculative_tokens": 5000}, r"must be an integer in 1..1024, got 5000"),
    ({"method": "ddtree", "num_speculative_tokens": 8, "tree_width": 3}, "Unexpected keyword argument"),
])
def test_bad_config_is_refused_before_start(models, spec, message):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match=message):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"model": models[1], **spec}).create_engine_config()


def test_quantized_kv_cache_is_refused_before_start(models):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match="does not support a quantized KV cache \\(kv_cache_dtype 'fp8'\\); use kv_cache_dtype"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512, kv_cache_dtype="fp8",
                   speculative_config={"model": models[1], "method": "ddtree",
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_soft_capped_attention_target_is_refused(models, tmp_path):
    import json
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    target = str(tmp_path / "softcap")
    shutil.copytree(models[0], target)
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump({**config, "attn_logit_softcapping": 50.0}, f)
    with pytest.raises(Exception, match="does not support targets with attention logit soft-capping"):
        EngineArgs(model=target, dtype="float32", max_model_len=512,
                   speculative_config={"model": models[1], "method": "ddtree",
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_non_dflash_drafter_is_refused(models):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match=r"needs a DFlash drafter .* architectures \['Qwen3ForCausalLM'\]"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"method": "ddtree", "model": models[0],
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_drafter_with_foreign_layer_ids_is_refused(models, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    # A speculators-format drafter numbers target layers one higher: 4 is past this 4-layer target.
    bad = write_dflash_drafter(str(tmp_path / "speculators"), target_layer_ids=(1, 4))
    with pytest.raises(Exception, match=r"target_layer_ids \[1, 4\] must name layers .* subtract 1"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"method": "ddtree", "model": bad,
                                       "num_speculative_tokens": 8}).create_engine_config()


@pytest.mark.parametrize("engine,message", [
    ({"async_scheduling": True}, "does not support async scheduling .*remove async_scheduling"),
    ({"speculative": {"disable_padded_drafter_batch": True}}, "does not support disable_padded_drafter_batch"),
    # A custom logits processor would run on vLLM's chain rows, never at the tree's nodes.
    ({"logits_processors": ["vllm.v1.sample.logits_processor.builtin.MinTokensLogitsProcessor"]},
     "does not support custom logits processors .*remove logits_processors"),
])
def test_engine_settings_ddtree_cannot_run_under_are_refused(models, engine, message):
    from vllm.engine.arg_utils import EngineArgs

    spec = {"model": models[1], "method": "ddtree", "num_speculative_tokens": 8, **engine.pop("speculative", {})}
    with pytest.raises(Exception, match=message):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512, speculative_config=spec,
                   **engine).create_engine_config()


def test_engine_settings_check_turns_async_scheduling_off_and_refuses_dbo():
    # vLLM turns async scheduling on by default for dflash on GPUs (the CPU platform turns it off for
    # every engine, so an engine here cannot show it): ddtree's check, run before vLLM resolves its
    # defaults, turns the unset default off with a log line and refuses what it cannot run under.
    from types import SimpleNamespace

    from vllm_ddtree.adapter.support import check_engine_settings

    lines = []
    log = SimpleNamespace(info=lambda message, *args: lines.append(message % args))

    def config(async_scheduling=None, enable_dbo=False):
        parallel = SimpleNamespace(enable_dbo=enable_dbo, pipeline_parallel_size=1, data_parallel_size=1,
                                   enable_expert_parallel=False)
        return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
                               parallel_config=parallel, model_config=SimpleNamespace(is_moe=False),
                               cache_config=SimpleNamespace(cache_dtype="auto"))

    unset = config()
    check_engine_settings(unset, log)
    assert unset.scheduler_config.async_scheduling is False and lines == [
        "ddtree: async scheduling off (the tree verifier and KV commit are synchronous with the step)"]
    explicit_off = config(async_scheduling=False)
    check_engine_settings(explicit_off, log)
    assert explicit_off.scheduler_config.async_scheduling is False and len(lines) == 1
    with pytest.raises(ValueError, match="does not support micro-batching .*remove enable_dbo"):
        check_engine_settings(config(enable_dbo=True), log)


USE_TP = "use tensor_parallel_size within a node and independent replicas across nodes"


@pytest.mark.parametrize("moe,engine,message", [
    (False, {"pipeline_parallel_size": 2},
     f"does not support pipeline parallelism .*set pipeline_parallel_size to 1 and {USE_TP}"),
    (False, {"tensor_parallel_size": 4, "decode_context_parallel_size": 2},
     f"does not support decode context parallelism .*set decode_context_parallel_size to 1 and {USE_TP}"),
    (False, {"prefill_context_parallel_size": 2},
     f"does not support prefill context parallelism .*set prefill_context_parallel_size to 1 and {USE_TP}"),
    (False, {"ubatch_size": 2}, "does not support micro-batching .*remove enable_dbo and ubatch_size"),
    (True, {"tensor_parallel_size": 2, "enable_expert_parallel": True},
     "does not support expert parallelism .*remove enable_expert_parallel: MoE targets run sharded by tensor"),
    (True, {"data_parallel_size": 2},
     "does not support data parallelism with a MoE target .*use tensor_parallel_size with"),
])
def test_parallel_settings_ddtree_cannot_run_under_are_refused_before_start(models, moe_target, moe, engine,
                                                                            message):
    # Through vLLM's own engine-config construction (nothing starts). The same settings without
    # speculation build a config, so the refusal is ddtree's; two exceptions here, which vLLM's
    # config refuses itself on this machine: prefill context parallelism (the V1 runner, the only one
    # on CPU, lacks it) and micro-batching (it needs a DeepEP or NIXL all-to-all backend).
    from vllm.engine.arg_utils import EngineArgs

    target = moe_target if moe else models[0]
    spec = {"model": models[1], "method": "ddtree", "num_speculative_tokens": 8}
    with pytest.raises(Exception, match=message):
        EngineArgs(model=target, dtype="float32", max_model_len=512, speculative_config=spec,
                   **engine).create_engine_config()
    if not {"prefill_context_parallel_size", "ubatch_size"} & set(engine):
        EngineArgs(model=target, dtype="float32", max_model_len=512, **engine).create_engine_config()


@pytest.mark.parametrize("engine,message", [
    ({"speculative": {"enable_adaptive_verification": True}},
     "does not support adaptive verification .*remove enable_adaptive_verification"),
    ({"watermark_config": {"key": 1}}, "does not support watermarking .*remove watermark_config"),
])
def test_settings_not_served_on_the_v2_runner_are_refused_before_start(models, monkeypatch, engine, message):
    # vLLM's V2 runner, asked for with its own switch: what ddtree does not serve there is refused
    # (tests/test_v2_runner.py runs what V2 serves).
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    spec = {"model": models[1], "method": "ddtree", "num_speculative_tokens": 8, "ddtree_budget": "fixed",
            **engine.pop("speculative", {})}
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512, speculative_config=spec,
                   **engine).create_engine_config()


def test_a_target_layer_without_tree_attention_is_refused_at_start(models, monkeypatch):
    # As if the target ran on an attention backend ddtree has no tree attention for: it would attend to
    # the tree causally and verify garbage, so the engine must not start (it did start, and failed in
    # its first tree step, before).
    from vllm_ddtree.adapter.attention import cpu

    monkeypatch.setattr(cpu, "serves", lambda impl: False)
    with pytest.raises(Exception, match="target layer .* uses CPUAttentionBackendImpl: .*--attention-backend FLASH_ATTN"):
        generate(models, PROMPTS[:2], spec={"method": "ddtree", "num_speculative_tokens": 4})
