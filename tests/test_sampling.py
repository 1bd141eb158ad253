"""Sampled output on trees follows the target's distribution: chi-square against an engine without
speculation (with a control that must fail), seeds, n > 1."""


from tiny_engines import DEAR_ROWS, PROMPTS, generate, run
from vllm import SamplingParams


def test_cost_aware_engine_decoding_plainly_samples_as_an_engine_without_speculation(flat):
    # Where no tree pays, a step's one logits row per request is sampled by vLLM's own sampler, as
    # without speculation: seeded sampled requests give the same tokens and logprobs token for token.
    prompts = PROMPTS[:6]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=s, logprobs=2)
              for s in range(len(prompts))]
    plain = run(flat, prompts, params)
    skipping = run(flat, prompts, params, spec={"method": "ddtree", "num_speculative_tokens": 16,
                                                "ddtree_budget": "cost-aware", "ddtree_step_costs": DEAR_ROWS})
    assert not skipping.metrics.get("vllm:spec_decode_num_drafts")
    assert skipping.tokens == plain.tokens
    for a, b in zip(plain.outputs, skipping.outputs):
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert {t: (p.logprob, p.rank) for t, p in step_a.items()} == \
                {t: (p.logprob, p.rank) for t, p in step_b.items()}


def test_n_samples(models):
    # n > 1 needs sampling: two samples per prompt through the tree verifier, reproducible per seed.
    params = SamplingParams(temperature=0.8, n=2, max_tokens=24, ignore_eos=True, seed=7)
    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    first, _ = generate(models, params=params, spec=spec)
    assert all(len(prompt) == 2 and all(len(sample) == 24 for sample in prompt) for prompt in first)
    assert generate(models, params=params, spec=spec)[0] == first


def test_seeded_sampling_follows_the_seed_not_the_batch(flat):
    # A seeded request's output depends on its seed and prompt only: the same requests in another
    # batch (reordered, unseeded requests in between) under another engine seed give the same tokens,
    # other seeds give other tokens. Seeds past 2**63 (torch stores them as uint64) key the noise too.
    seeds = [0, 1, 2, 3, 2**64 - 1, 2**63]
    prompts = PROMPTS[: len(seeds)]
    spec = {"method": "ddtree", "num_speculative_tokens": 16}

    def params(seed):
        return SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=seed)

    first, _ = generate(flat, prompts, [params(s) for s in seeds], spec, seed=0)
    mixed_prompts = [p for prompt in reversed(prompts) for p in (prompt, "alpha")]
    mixed_params = [p for s in reversed(seeds) for p in (params(s), params(None))]
    mixed, _ = generate(flat, mixed_prompts, mixed_params, spec, seed=1)
    assert mixed[::2][::-1] == first
    other, _ = generate(flat, prompts, [params(s + 1000) for s in seeds[:4]] + [params(7), params(8)], spec, seed=0)
    assert sum(a != b for a, b in zip(first, other)) >= len(seeds) - 1


def test_sampled_distribution_matches_no_speculation(flat):
    # First three tokens of one prompt, 600 samples: ddtree with n = 2 (300 requests, two samples each)
    # against the engine without speculation (chi-square homogeneity on token pairs 2-3, the ones
    # drafted in the tree), and a control that the test rejects a different temperature.
    def pairs(spec, temperature, n):
        params = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True, n=n)
        tokens, _ = generate(flat, prompts=["alpha beta"] * (600 // n), params=params, spec=spec)
        return [tuple(sample[1:]) for request in tokens for sample in request]

    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    plain, tree, colder = pairs(None, 1.0, 1), pairs(spec, 1.0, 2), pairs(spec, 0.6, 2)
    assert len(plain) == len(tree) == 600
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, colder) < 1e-3


def test_sampled_distribution_with_penalties_matches_no_speculation(flat):
    # As above with presence, frequency and repetition penalties, which make each token's distribution
    # depend on the tokens before it (at a node: the node's path). Control: a tree engine whose
    # requests carry no penalties must be told apart.
    def pairs(spec, penalties, n):
        params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, n=n, **penalties)
        tokens, _ = generate(flat, prompts=["alpha beta"] * (600 // n), params=params, spec=spec)
        return [tuple(sample[1:]) for request in tokens for sample in request]

    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    penalties = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.5)
    plain, tree, weaker = pairs(None, penalties, 1), pairs(spec, penalties, 2), pairs(spec, {}, 2)
    assert len(plain) == len(tree) == 600
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, weaker) < 1e-3


def _homogeneity_p(a, b):
    import numpy as np
    from scipy.stats import chi2_contingency

    cells = sorted(set(a) | set(b))
    table = np.array([[a.count(c) for c in cells], [b.count(c) for c in cells]], dtype=float)
    keep = table.sum(0) >= 10  # pool rare pairs into one cell
    table = np.column_stack([table[:, keep], table[:, ~keep].sum(1)]) if (~keep).any() else table
    return chi2_contingency(table[:, table.sum(0) > 0]).pvalue
