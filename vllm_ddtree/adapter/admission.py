"""Request admission for ddtree engines: sampling features the tree verifier does not apply yet are
refused when the request arrives (a 400 from the server, a ValueError from ``LLM.generate``), never
mid-step, where an error would take the engine down with every request in flight.

This is the one place those features are checked; the verifier relies on it. The hook is on
``InputProcessor.__init__`` (construction only): an input processor of a ddtree engine gets an
instance-level ``_validate_params`` that adds the check; other engines keep vLLM's.
"""

from __future__ import annotations

from vllm_ddtree.adapter import patching
from vllm_ddtree.adapter.config import hook_ddtree_instances

_ALTERNATIVE = 'drop it, or serve this request from an engine with method "dflash"'


def unsupported_feature(params, reasoning_parser: str = "") -> tuple[str, str] | None:
    """(parameter, message) for the first feature of ``params`` that ddtree cannot honour on an engine
    with ``reasoning_parser`` (vLLM's ``--reasoning-parser``), else None."""
    checks = [
        # Penalties, allowed_token_ids, bad_words and min_tokens are applied at every tree node
        # (vllm_ddtree.node_logits), prompt logprobs come from prefill rows as without speculation,
        # structured outputs get a grammar row per node (adapter/structured_outputs.py); vLLM itself
        # refuses min_p and logit_bias with speculation.
        ("min_p", params.min_p > 0.0, "min_p"),
        ("logit_bias", bool(params.logit_bias), "logit_bias"),
        # With a reasoning parser a grammar starts wherever the reasoning ends, which in a tree
        # differs from branch to branch.
        ("structured_outputs", params.structured_outputs is not None and bool(reasoning_parser),
         f"structured outputs on an engine with a reasoning parser ({reasoning_parser!r})"),
        ("thinking_token_budget", getattr(params, "thinking_token_budget", None) is not None,
         "thinking_token_budget"),
    ]
    for parameter, used, name in checks:
        if used:
            return parameter, f"speculative method ddtree does not support {name} yet; {_ALTERNATIVE}"
    return None


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    hook_ddtree_instances(InputProcessor, _hook_instance)


def _hook_instance(processor) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    def make(original):
        def _validate_params(params, *args, **kwargs):
            result = original(params, *args, **kwargs)
            if isinstance(params, SamplingParams):
                parser = processor.vllm_config.structured_outputs_config.reasoning_parser
                refused = unsupported_feature(params, parser)
                if refused is not None:
                    raise VLLMValidationError(refused[1], parameter=refused[0])
            return result

        return _validate_params

    patching.wrap(processor, "_validate_params", make)
