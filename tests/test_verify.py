"""verify_tree: the greedy walk against the reference's walk, and losslessness as the product promises it."""

import numpy as np
import pytest
import torch
from scipy import stats
from oracle import exact_distribution, processed_probs_numpy

from vllm_ddtree.tools.toy import MarkovTarget, generate_sequentially, generate_with_trees
from vllm_ddtree.tree import build_tree
from vllm_ddtree.verify import TreeSampling, processed_weights, verify_tree, walk_tree


def reference_walk(token_ids, parents, num_nodes, posterior):
    """The reference's follow_verified_tree: child maps, then follow the target's tokens."""
    child_maps = [dict() for _ in range(num_nodes + 1)]
    for i in range(1, num_nodes + 1):
        child_maps[parents[i - 1]][token_ids[i - 1]] = i
    accepted, current = [0], 0
    while posterior[current] in child_maps[current]:
        current = child_maps[current][posterior[current]]
        accepted.append(current)
    return accepted, posterior[current]


@pytest.mark.parametrize("depth,budget", [(1, 1), (4, 4), (6, 32), (15, 64)])
def test_greedy_walk_matches_reference(depth, budget, device):
    gen = torch.Generator().manual_seed(depth * 100 + budget)
    R, V = 64, 7
    tree = build_tree(torch.randn(R, depth, V, generator=gen).to(device) * 2, budget)
    # Target logits whose argmax often follows the tree, so that paths of every length occur.
    logits = torch.randn(R, budget + 1, V, generator=gen)
    nodes = torch.cat([torch.zeros(R, 1, dtype=torch.long), tree.token_ids.cpu()], 1)
    favour = torch.rand(R, budget + 1, generator=gen) < 0.9
    for r in range(R):
        for i in range(1, int(tree.num_nodes[r]) + 1):
            p = int(tree.parents[r, i - 1])
            if favour[r, p]:
                logits[r, p, nodes[r, i]] += 10.0
    logits = logits.to(device)
    verdict = verify_tree(tree, logits, TreeSampling.greedy(R, device), torch.zeros(R, dtype=torch.long, device=device))
    lengths = []
    for r in range(R):
        n = int(tree.num_nodes[r])
        want, bonus = reference_walk(tree.token_ids[r].tolist(), tree.parents[r].tolist(), n,
                                     logits[r].argmax(-1).tolist())
        k = len(want) - 1
        lengths.append(k)
        assert int(verdict.num_accepted[r]) == k
        assert verdict.accepted_nodes[r].tolist() == want + [-1] * (depth - k)
        emitted = [int(nodes[r, i]) for i in want[1:]] + [bonus]
        assert verdict.output_tokens[r].tolist() == emitted + [-1] * (depth - k)
    assert max(lengths) >= min(depth, 4)  # the walk really goes deep


def test_walk_on_empty_tree(device):
    tree = build_tree(torch.randn(3, 4, 5, device=device), 0)
    nodes, n = walk_tree(tree, torch.zeros(3, 1, dtype=torch.long, device=device))
    assert n.tolist() == [0, 0, 0] and nodes[:, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.7, 0.0), (4, 0.8, 0.1),
                                               (1, 1.0, 0.0), (0, 1.0, 0.3)])
def test_processing_matches_independent_numpy(top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3, 9, generator=gen) * 2
    logits[0, 0, :4] = 1.0  # ties at the top-k cut
    for temperature in (0.5, 1.0):
        weights = processed_weights(logits, TreeSampling.uniform(6, temperature, top_k, top_p, min_p))
        got = weights / weights.sum(-1, keepdim=True)
        for r in range(6):
            for n in range(3):
                want = processed_probs_numpy(logits[r, n].double().numpy(), temperature, top_k, top_p, min_p)
                np.testing.assert_allclose(got[r, n].numpy(), want, atol=1e-6)


TREES = {  # name: (depth, budget, sharp draft)
    "chain": (3, 3, True),
    "wide": (1, 6, False),
    "deep": (6, 24, False),
}
PARAMS = {0.5: (4, 0.9, 0.0), 1.0: (0, 0.85, 0.05)}


@pytest.mark.parametrize("shape", sorted(TREES))
@pytest.mark.parametrize("temperature", sorted(PARAMS))
def test_seeded_output_equals_sequential_sampling(shape, temperature):
    # The noise is keyed by (seed, position), so a tree round must emit exactly what
    # sequential sampling emits for the same seeds, whatever the tree looks like.
    target = MarkovTarget(vocab=6, seed=1)
    depth, budget, sharp = TREES[shape]
    sampling = TreeSampling.uniform(2000, temperature, *PARAMS[temperature], seeds=torch.arange(2000) * 7919)
    got, rounds = generate_with_trees(target, [1, 2], 8, sampling, depth, budget, sharp=sharp)
    assert torch.equal(got, generate_sequentially(target, [1, 2], 8, sampling))
    if depth > 1:
        assert rounds.float().mean() < 0.8 * 8  # trees were accepted beyond the root


@pytest.mark.parametrize("shape", sorted(TREES))
@pytest.mark.parametrize("temperature", sorted(PARAMS))
def test_emitted_distribution_is_the_targets(shape, temperature):
    target = MarkovTarget(vocab=6, seed=2)
    depth, budget, sharp = TREES[shape]
    draws, length, context = 100_000, 3, [4, 0]
    sampling = TreeSampling.uniform(draws, temperature, *PARAMS[temperature],
                                    seeds=torch.randint(0, 2**62, (draws,), generator=torch.Generator().manual_seed(9)))
    seqs, _ = generate_with_trees(target, context, length, sampling, depth, budget, sharp=sharp, seed=3)
    expected = exact_distribution(target, context, length, temperature, *PARAMS[temperature])
    p_value = _chi_square_p(seqs, expected, target.vocab)
    assert p_value > 1e-3, p_value
    # The test has power: the same draws are rejected against a slightly different target.
    other = exact_distribution(target, context, length, temperature * 1.15, *PARAMS[temperature])
    assert _chi_square_p(seqs, other, target.vocab) < 1e-6


def _chi_square_p(seqs, expected, vocab):
    codes = (seqs * torch.tensor([vocab ** 2, vocab, 1])).sum(1)
    observed = torch.bincount(codes, minlength=vocab ** 3).numpy().astype(float)
    probs = np.zeros(vocab ** 3)
    for seq, p in expected.items():
        probs[seq[0] * vocab ** 2 + seq[1] * vocab + seq[2]] = p
    n = observed.sum()
    impossible = probs == 0
    assert observed[impossible].sum() == 0  # never emits what the processed target forbids
    big = probs * n >= 5
    obs = np.append(observed[big], observed[~big & ~impossible].sum())
    exp = np.append(probs[big] * n, probs[~big & ~impossible].sum() * n)
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


def test_host_flags_skip_work_without_changing_tokens():
    # all_greedy (argmax only), all_random (no argmax), truncated=False (no vocabulary sort) and
    # uses_min_p=False are shortcuts, not new rules.
    from dataclasses import replace

    from vllm_ddtree.verify import sample_target_tokens

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 9, 300, generator=gen) * 3
    positions = torch.arange(9).expand(4, -1) + 17
    for temperature in (0.0, 0.7, 1.0):
        sampling = TreeSampling.uniform(4, temperature, seeds=torch.arange(4) * 11)
        assert sampling.all_greedy == (temperature == 0) and sampling.all_random == (temperature > 0)
        assert not sampling.truncated and not sampling.uses_min_p
        general = replace(sampling, all_greedy=False, all_random=False, truncated=True, uses_min_p=True)
        assert torch.equal(sample_target_tokens(logits, sampling, positions),
                           sample_target_tokens(logits, general, positions))
    assert TreeSampling.uniform(4, 1.0, top_p=0.9).truncated and TreeSampling.uniform(4, 1.0, top_k=5).truncated
    assert TreeSampling.uniform(4, 1.0, min_p=0.1).uses_min_p


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_flat_logits_and_row_chunks_give_the_same_verdict(temperature, monkeypatch, device):
    # vLLM hands flat logits, each request's root and drafted nodes in a row, a request with fewer
    # drafts (the scheduler cut its tree) with fewer rows. Verifying them in place must equal
    # verifying the [R, B+1, V] layout, and sampling rows in small chunks must equal one pass.
    from dataclasses import replace

    from vllm_ddtree import row_chunks
    from vllm_ddtree.verify import SAMPLE_BYTES_PER_ENTRY

    gen = torch.Generator().manual_seed(11)
    R, D, B, V = 5, 4, 12, 40
    tree = build_tree(torch.randn(R, D, V, generator=gen).to(device) * 2, B)
    kept = torch.tensor([12, 0, 5, 12, 1], device=device)  # drafts each request kept
    used = torch.arange(B, device=device) < kept.unsqueeze(1)
    tree = replace(tree, token_ids=torch.where(used, tree.token_ids, -1), num_nodes=torch.minimum(tree.num_nodes, kept))
    logits = (torch.randn(R, B + 1, V, generator=gen) * 3).to(device)
    sampling = TreeSampling.uniform(R, temperature, top_k=7, top_p=0.9, seeds=torch.arange(R) * 13, device=device)
    roots = torch.tensor([3, 9, 0, 40, 7], device=device)
    want = verify_tree(tree, logits, sampling, roots)

    flat = torch.cat([logits[r, : int(kept[r]) + 1] for r in range(R)])
    starts = torch.cumsum(kept + 1, 0) - (kept + 1)
    for rows_at_once in (flat.shape[0], 3):
        monkeypatch.setattr(row_chunks, "WORKING_SET_BYTES", rows_at_once * V * SAMPLE_BYTES_PER_ENTRY)
        assert row_chunks.rows_per_chunk(V * SAMPLE_BYTES_PER_ENTRY) == rows_at_once
        got = verify_tree(tree, flat, sampling, roots, row_starts=starts)
        assert torch.equal(got.accepted_nodes, want.accepted_nodes)
        assert torch.equal(got.output_tokens, want.output_tokens)
        real = torch.arange(B + 1, device=device) <= kept.unsqueeze(1)
        assert torch.equal(got.target_tokens[real], want.target_tokens[real])
