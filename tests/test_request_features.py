"""vLLM's history-dependent sampling features (penalties, min_tokens, bad words, allowed tokens) on
trees, applied at every node with its path as history."""

import pytest
from tiny_engines import PROMPTS, feature_params, run


@pytest.mark.parametrize("budget", [4, 64])
def test_sampling_features_at_every_node_equal_no_speculation(models, reference, feature_reference, budget):
    # Penalties, min_tokens, bad_words and allowed_token_ids in one mixed batch with plain requests:
    # every answer equals the engine's without speculation, and trees were verified and accepted
    # (at B = 64 the feature requests alone reach tau 2.0: their nodes' paths shape the processing).
    names, params = feature_params(models, reference)
    result = run(models, PROMPTS, params, spec={"method": "ddtree", "num_speculative_tokens": budget})
    assert result.tokens == feature_reference
    if budget >= 10:  # (the tiny pair accepts deep paths from B = 10 on: processed nodes below the root count)
        assert result.tau > 1.5
