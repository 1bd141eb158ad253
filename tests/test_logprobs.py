"""Logprobs on trees, in every mode, equal an engine without speculation's."""

import pytest
from tiny_engines import PROMPTS, run
from vllm import SamplingParams


def test_logprobs_equal_no_speculation(models):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)

    def outputs(spec):
        return [o.outputs[0] for o in run(models, params=params, spec=spec).outputs]

    plain, tree = outputs(None), outputs({"method": "ddtree", "num_speculative_tokens": 16})
    for a, b in zip(plain, tree):
        assert list(a.token_ids) == list(b.token_ids)
        assert len(b.logprobs) == len(b.token_ids)
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-3)
                assert step_b[token].rank == step_a[token].rank


@pytest.mark.parametrize("mode", ["processed_logprobs", "processed_logits"])
def test_processed_logprobs_equal_no_speculation(models, mode):
    # vLLM's processed modes: each token's logprobs after the request's logits processors (here
    # penalties, which depend on the node's path), and, in a batch that samples, after temperature and
    # top-k/top-p. Greedy requests with penalties must match the engine without speculation; the
    # sampled request (top-k 3) must emit tokens its processed row allows, with three finite entries.
    penalized = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3, presence_penalty=0.8,
                               repetition_penalty=1.3)
    sampled = SamplingParams(temperature=0.8, top_k=3, seed=1, max_tokens=24, ignore_eos=True, logprobs=5)
    params = [penalized] * 5 + [sampled]

    def outputs(spec):
        return [o.outputs[0] for o in run(models, PROMPTS[:6], params, spec=spec, logprobs_mode=mode).outputs]

    plain, tree = outputs(None), outputs({"method": "ddtree", "num_speculative_tokens": 16})
    for a, b in zip(plain[:5], tree[:5]):
        assert list(a.token_ids) == list(b.token_ids)
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-4)
    raw = [o.outputs[0] for o in run(models, PROMPTS[:1], penalized, spec={"method": "ddtree",
                                                                            "num_speculative_tokens": 16}).outputs]
    assert [s[t].logprob for s, t in zip(raw[0].logprobs, raw[0].token_ids)] != pytest.approx(
        [s[t].logprob for s, t in zip(tree[0].logprobs, tree[0].token_ids)], abs=1e-3)  # processing shows
    for step, token in zip(tree[5].logprobs, tree[5].token_ids):
        assert step[token].logprob > float("-inf")
        assert sum(lp.logprob > float("-inf") for lp in step.values()) == 3  # the top-k cut, in the processed row


def test_prompt_logprobs_equal_no_speculation(models):
    # Prompt logprobs come from the prefill rows, which trees never touch; they must come back as
    # without speculation, next to tree-verified sample logprobs.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=3)

    def outputs(spec):
        return run(models, params=params, spec=spec)

    plain, tree = outputs(None), outputs({"method": "ddtree", "num_speculative_tokens": 16})
    assert tree.tau > 1.5
    for a, b in zip(plain.outputs, tree.outputs):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        assert len(b.prompt_logprobs) == len(a.prompt_logprobs) == len(a.prompt_token_ids)
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for step_a, step_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-4)
                assert step_b[token].rank == step_a[token].rank
