"""Request admission for ddtree engines: sampling features the tree verifier does not apply yet are
refused when the request arrives (a 400 from the server, a ValueError from ``LLM.generate``), never
mid-step, where an error would take the engine down.
"""

from __future__ import annotations

from vllm_ddtree.adapter.config import is_ddtree

_ALTERNATIVE = 'drop it, or serve this request from an engine with method "dflash"'


def unsupported_feature(params) -> tuple[str, str] | None:
    """(parameter, message) for the first feature of ``params`` that ddtree cannot honour, else None."""
    checks = [
        ("prompt_logprobs", params.prompt_logprobs is not None, "prompt_logprobs"),
        ("presence_penalty", params.presence_penalty != 0.0, "presence penalties"),
        ("frequency_penalty", params.frequency_penalty != 0.0, "frequency penalties"),
        ("repetition_penalty", params.repetition_penalty != 1.0, "repetition penalties"),
        ("min_p", params.min_p > 0.0, "min_p"),
        ("logit_bias", bool(params.logit_bias), "logit_bias"),
        ("allowed_token_ids", bool(params.allowed_token_ids), "allowed_token_ids"),
        ("bad_words", bool(params.bad_words), "bad_words"),
        ("structured_outputs", params.structured_outputs is not None, "structured outputs"),
        # vLLM applies these to chain drafts in its rejection sampler; tree nodes would escape them.
        ("min_tokens", params.min_tokens > 0, "min_tokens"),
        ("thinking_token_budget", getattr(params, "thinking_token_budget", None) is not None,
         "thinking_token_budget"),
    ]
    for parameter, used, name in checks:
        if used:
            return parameter, f"speculative method ddtree does not support {name} yet; {_ALTERNATIVE}"
    return None


def required_internals():
    from vllm.v1.engine import input_processor

    return [("vllm.v1.engine.input_processor.InputProcessor._validate_params",
             hasattr(getattr(input_processor, "InputProcessor", None), "_validate_params"))]


def apply() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_ddtree_patched", False):
        return
    original = InputProcessor._validate_params

    def _validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        if isinstance(params, SamplingParams) and is_ddtree(self.speculative_config):
            refused = unsupported_feature(params)
            if refused is not None:
                raise VLLMValidationError(refused[1], parameter=refused[0])
        return result

    InputProcessor._validate_params = _validate_params
    InputProcessor._ddtree_patched = True
