"""The cost-aware budget: the kept nodes equal a plain-Python greedy reference of the rule, and the cost
tables are the monotone convex fit of their samples."""

import math
import random

import pytest
import torch

from vllm_ddtree.budget import StepCosts, convex_table, kept_nodes
from vllm_ddtree.tree import build_tree


def reference_kept(scores, step, draft, base_rows):
    """The rule, node by node: best-first over the whole batch, stop at the first node that does not pay."""
    R, B = len(scores), len(scores[0])
    nodes = sorted(((s, r * B + j) for r in range(R) for j, s in enumerate(scores[r])),
                   key=lambda node: (-node[0], node[1]))  # ties: flat order, as a stable sort keeps them
    kept, phi, rows = [0] * R, 0.0, base_rows
    for score, flat in nodes:
        if score == -math.inf or rows + 1 >= len(step):
            break
        delta, extra = math.exp(score), step[rows + 1] - step[rows]
        if extra != 0 and not delta * (draft[min(R, len(draft) - 1)] + step[rows]) > (R + phi) * extra:
            break
        kept[flat // B] += 1
        phi += delta
        rows += 1
    draft_cost = draft[min(R, len(draft) - 1)]
    if not (R + phi) * step[min(base_rows, len(step) - 1)] > R * (draft_cost + step[min(rows, len(step) - 1)]):
        return [0] * R  # plain decoding is faster than this tree
    return kept


def _random_costs(rng, max_rows, max_requests):
    """A convex non-decreasing step cost (fixed part + linear + quadratic) and a drafter cost."""
    fixed, linear, quad = rng.uniform(1, 20), rng.uniform(0, 2), rng.uniform(0, 0.05)
    step = {n: fixed + linear * n + quad * n * n for n in (1, 2, 4, 8, 16, 32, 64, 128, max_rows)}
    draft = {r: rng.uniform(0.5, 10) * (1 + 0.1 * r) for r in (1, 4, 16, max_requests)}
    return StepCosts.from_samples(step, draft, max_rows, max_requests)


@pytest.mark.parametrize("seed", range(12))
def test_kept_nodes_equal_the_greedy_reference(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    R, D, V, B = rng.choice([1, 3, 8]), rng.choice([3, 7]), 30, rng.choice([4, 16, 48])
    tree = build_tree(torch.randn(R, D, V, generator=gen) * rng.uniform(0.5, 4), B)
    costs = _random_costs(rng, max_rows=rng.choice([R * (B + 1), 64, 300]), max_requests=16)
    base_rows = R + rng.choice([0, 5])  # a prefill chunk's rows share the step
    kept = kept_nodes(tree.scores, costs, base_rows)
    assert kept.tolist() == reference_kept(tree.scores.tolist(), costs.step.tolist(), costs.draft.tolist(), base_rows)
    assert (kept <= tree.num_nodes).all()


def test_free_rows_keep_every_node_and_dear_rows_keep_none():
    gen = torch.Generator().manual_seed(0)
    tree = build_tree(torch.randn(5, 7, 40, generator=gen), 16)
    flat = StepCosts.from_samples({1: 1.0, 1000: 1.0}, {1: 0.0, 64: 0.0}, 1000, 64)  # rows and drafts cost nothing
    assert torch.equal(kept_nodes(tree.scores, flat), tree.num_nodes)
    dear = StepCosts.from_samples({1: 1.0, 1000: 1e6}, {1: 1.0, 64: 1.0}, 1000, 64)
    assert kept_nodes(tree.scores, dear).sum() == 0
    short = StepCosts.from_samples({1: 1.0, 10: 1.0}, {1: 0.0, 64: 0.0}, 10, 64)  # the step holds 10 rows
    assert kept_nodes(tree.scores, short).sum() == 10 - 5
    dear_drafter = StepCosts.from_samples({1: 1.0, 1000: 1.0}, {1: 1e3, 64: 1e3}, 1000, 64)  # no tree pays it back
    assert kept_nodes(tree.scores, dear_drafter).sum() == 0


def test_kept_nodes_are_the_best_of_each_request():
    # The rule takes nodes in best-first order across requests, so a request's kept nodes are a
    # prefix of its pop order, and across requests no dropped node beats a kept one.
    gen = torch.Generator().manual_seed(4)
    tree = build_tree(torch.randn(6, 7, 40, generator=gen) * 3, 32)
    costs = StepCosts.from_samples({1: 10.0, 40: 11.0, 200: 40.0}, {1: 2.0, 8: 3.0}, 400, 8)
    kept = kept_nodes(tree.scores, costs)
    assert 0 < kept.sum() < tree.num_nodes.sum()
    slot = torch.arange(32)
    is_kept = slot < kept.unsqueeze(1)
    assert tree.scores[is_kept].min() >= tree.scores[~is_kept & (slot < tree.num_nodes.unsqueeze(1))].max()
    cut = tree.cut(kept)
    assert torch.equal(cut.num_nodes, kept) and cut.token_ids.eq(-1).sum(1).tolist() == (32 - kept).tolist()
    assert torch.equal(cut.token_ids[is_kept], tree.token_ids[is_kept])


def test_cost_tables_are_the_monotone_convex_fit():
    samples = {1: 5.0, 2: 5.2, 4: 4.9, 8: 6.0, 16: 7.0, 32: 12.0, 64: 30.0}  # one noisy dip at 4
    table = convex_table(samples, 100)
    assert table.shape == (101,) and table.dtype == torch.float64
    assert (table[1:] - table[:-1] >= -1e-12).all()  # non-decreasing
    slopes = table[2:] - 2 * table[1:-1] + table[:-2]
    assert (slopes >= -1e-9).all()  # convex
    for rows, seconds in samples.items():
        assert table[rows] <= seconds + 1e-9  # a minorant
    assert table[1] == table[4] == pytest.approx(4.9)  # flat before the minimum
    assert table[64] == pytest.approx(30.0) and table[100] > table[64]  # extended past the last sample
    with pytest.raises(ValueError, match="at least two samples"):
        convex_table({1: 1.0}, 10)


def test_calibration_scales_every_delta_and_learns_the_accepted_share():
    from vllm_ddtree.budget import AcceptanceCalibration

    gen = torch.Generator().manual_seed(6)
    tree = build_tree(torch.randn(4, 7, 40, generator=gen) * 2, 24)
    costs = _random_costs(random.Random(6), max_rows=200, max_requests=16)
    halved = kept_nodes(tree.scores, costs, calibration=torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(halved, kept_nodes(tree.scores + math.log(0.5), costs))
    # The drafter expects 4 accepted nodes where the target accepts 1: the ratio moves toward 1/4.
    calibration = AcceptanceCalibration("cpu", weight=0.5)
    scores = torch.full((2, 3), math.log(2 / 3))  # two trees of three nodes, 2/3 each: 4 expected
    calibration.update(scores, torch.tensor([1, 0]))
    assert calibration.value.item() == pytest.approx(0.5 * 1 + 0.5 * 0.25)
    calibration.update(torch.full((2, 3), float("-inf")), torch.tensor([0, 0]))  # no node verified
    assert calibration.value.item() == pytest.approx(0.625)
