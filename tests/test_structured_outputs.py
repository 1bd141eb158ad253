"""Structured outputs (JSON schema, regex, choice, grammar) on trees: a grammar row per node."""

import json

import pytest
from tiny_engines import CHOICES, PROMPTS, STRUCTURED_ENGINE, run, structured, structured_params
from vllm import SamplingParams


@pytest.mark.parametrize("budget", [4, 64])
def test_structured_outputs_equal_no_speculation(models, structured_reference, budget):
    # JSON schema (nested objects and arrays), regex, choice and grammar requests in one batch with
    # plain ones: every answer equals the engine's without speculation. At B = 64 trees go deep
    # inside the constrained answers (strings, repetitions), so grammar rows below the root matter.
    kinds, params = structured_params()
    result = run(models, PROMPTS, params, spec={"method": "ddtree", "num_speculative_tokens": budget},
                 **STRUCTURED_ENGINE)
    assert result.tokens == structured_reference
    texts = [o.outputs[0].text for o in result.outputs]
    assert json.loads(texts[0])["items"] and texts[3] in CHOICES
    if budget >= 10:
        assert result.tau > 1.5


def test_structured_outputs_stay_valid_for_every_sampled_request(models):
    # 256 sampled requests (T = 1) under one JSON schema: every answer parses and fits the schema.
    params = SamplingParams(temperature=1.0, max_tokens=160, structured_outputs=structured("json"))
    result = run(models, [PROMPTS[i % len(PROMPTS)] for i in range(256)], params,
                 spec={"method": "ddtree", "num_speculative_tokens": 16}, **STRUCTURED_ENGINE)
    assert result.target_steps > 0
    for output in result.outputs:
        answer = json.loads(output.outputs[0].text)
        assert set(answer) == {"title", "items"} and len(answer["title"]) <= 12 and 1 <= len(answer["items"]) <= 3
        assert all(set(item) == {"tag", "ok"} and isinstance(item["ok"], bool) for item in answer["items"])
