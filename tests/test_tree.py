"""build_tree against the reference heap, node for node, on thousands of random requests.

All three selections run every test: the torch beams (``builder="beams"``), the one-launch Triton
kernel (``"kernel"``, under ``TRITON_INTERPRET=1`` on CPU) and the host heap (``"heap"``), so each
equals the reference heap on its own.
"""

import os

import numpy as np
import pytest
import torch
from reference_heap import reference_tree

from vllm_ddtree.tree import build_tree, draft_topk, pack_bits, unpack_bits

TRIALS = int(os.environ.get("DDTREE_TREE_TRIALS", "30"))  # x 24 requests x 5 kinds

# The interpreter runs the kernel's programs one op at a time (~5 s per 24 requests): fewer trials
# on CPU (3 x 24 requests of each kind), the full count where the kernel is compiled.
KERNEL_TRIALS = TRIALS if torch.cuda.is_available() else max(1, TRIALS // 10)
builders = pytest.mark.parametrize("builder", ["beams", "kernel", "heap"])


def _paths(tree, r):
    n = int(tree.num_nodes[r])
    paths = {0: ()}
    for i in range(1, n + 1):
        paths[i] = paths[int(tree.parents[r, i - 1])] + (int(tree.token_ids[r, i - 1]),)
    return [paths[i] for i in range(1, n + 1)]


def _check_against_reference(logits, budgets, max_budget, builder):
    tree = build_tree(logits, budgets, max_budget, builder=builder)
    k = min(max_budget, logits.shape[-1])
    logp, tokens = draft_topk(logits, k) if k else (None, None)
    for r in range(logits.shape[0]):
        want = reference_tree(logp[r].cpu().numpy(), tokens[r].cpu().numpy(), int(budgets[r])) if k else []
        n = len(want)
        assert int(tree.num_nodes[r]) == n
        # Same nodes in the same (pop) order, so the same parent numbering, depths and scores.
        assert _paths(tree, r) == [w[0] for w in want]
        assert tree.parents[r, :n].tolist() == [w[1] for w in want]
        assert tree.depths[r, :n].tolist() == [w[2] for w in want]
        np.testing.assert_array_equal(tree.scores[r, :n].cpu().numpy(), np.array([w[3] for w in want], np.float32))
        # Unused slots can never be accepted.
        assert (tree.token_ids[r, n:] == -1).all()
    return tree


def _logits(gen, R, D, V, kind):
    if kind == "gauss":
        x = torch.randn(R, D, V, generator=gen) * 3
    elif kind == "ties":  # few distinct values: many equal scores, within and across depths
        x = torch.randint(0, 3, (R, D, V), generator=gen).float()
    elif kind == "same_rows":  # every depth identical: permuted paths tie exactly
        x = torch.randint(0, 4, (R, 1, V), generator=gen).float().expand(R, D, V).contiguous()
    elif kind == "masked":  # masked vocabulary, some depths entirely masked
        x = torch.randn(R, D, V, generator=gen)
        x[torch.rand(R, D, V, generator=gen) < 0.6] = float("-inf")
        x[torch.rand(R, D, generator=gen) < 0.1] = float("-inf")
    elif kind == "certain":  # probability-1 tokens: children score exactly like their parents
        x = torch.full((R, D, V), float("-inf"))
        x[..., 0] = 0.0
        x[:, ::2, min(1, V - 1)] = 0.0
    return x


@builders
@pytest.mark.parametrize("kind", ["gauss", "ties", "same_rows", "masked", "certain"])
def test_matches_reference_heap(kind, builder, device):
    gen = torch.Generator().manual_seed(hash(kind) % 1000)
    for trial in range(KERNEL_TRIALS if builder == "kernel" else TRIALS):
        R = 24
        D = int(torch.randint(1, 7, (1,), generator=gen))
        V = int(torch.randint(1, 12, (1,), generator=gen))
        B = int(torch.randint(0, 40, (1,), generator=gen))
        budgets = torch.randint(0, B + 1, (R,), generator=gen)
        budgets[0] = B
        logits = _logits(gen, R, D, V, kind).to(device)
        _check_against_reference(logits, budgets.to(device), B, builder)


@builders
@pytest.mark.parametrize("budget", [0, 1, 2, 7, 15 * 3 + 100])
def test_budget_edges(budget, builder, device):
    # V = 3 and D = 15: a budget over the whole tree's size takes every node the top-K allows.
    gen = torch.Generator().manual_seed(budget)
    logits = torch.randn(8, 15, 3, generator=gen).to(device)
    tree = _check_against_reference(logits, torch.full((8,), budget), budget, builder)
    assert tree.token_ids.shape == (8, budget)
    assert tree.ancestor_bits.shape == (8, budget + 1, (budget + 1 + 31) // 32)


@builders
def test_int_budget_equals_tensor_budget(builder, device):
    logits = torch.randn(5, 15, 50, generator=torch.Generator().manual_seed(1)).to(device)
    a = build_tree(logits, 32, builder=builder)
    b = build_tree(logits, torch.full((5,), 32, device=device), max_budget=32, builder=builder)
    for name in ("token_ids", "parents", "depths", "scores", "num_nodes", "ancestor_bits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@builders
def test_large_vocab_realistic_shape(builder, device):
    # D = 15 (a b16 drafter), a real vocabulary size, peaked drafts as a trained drafter gives.
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 15, 151936, generator=gen) * 4).to(device)
    _check_against_reference(logits, torch.tensor([64, 16, 1, 128]), 128, builder)


@builders
def test_ancestor_mask_and_order(builder, device):
    gen = torch.Generator().manual_seed(7)
    tree = build_tree((torch.randn(16, 6, 9, generator=gen) * 2).to(device), 40, builder=builder)
    mask = tree.ancestor_mask().cpu()
    parents = tree.parents.cpu()
    for r in range(16):
        n = int(tree.num_nodes[r])
        for i in range(1, n + 1):
            p = int(parents[r, i - 1])
            assert p < i  # parents before children
            expect = mask[r, p].clone()
            expect[i] = True
            assert torch.equal(mask[r, i], expect)
            assert int(tree.depths[r, i - 1]) == (int(tree.depths[r, p - 1]) + 1 if p else 1)
        assert torch.equal(mask[r, 0], torch.nn.functional.one_hot(torch.tensor(0), 41).bool())
        for i in range(n + 1, 41):  # padding rows see the root and themselves only
            assert mask[r, i].nonzero().flatten().tolist() == [0, i]


def test_bit_packing_roundtrip():
    mask = torch.rand(3, 5, 70) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, 3)
    assert torch.equal(unpack_bits(packed, 70), mask)
    assert pack_bits(torch.ones(1, 32, dtype=torch.bool)).item() == -1  # bit 31 is the sign bit


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_budget"):
        build_tree(torch.zeros(1, 2, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[R, D, V\]"):
        build_tree(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        build_tree(torch.zeros(1, 2, 3), -1)
    with pytest.raises(ValueError, match="max_children must be >= 1"):
        build_tree(torch.zeros(1, 2, 3), 2, max_children=0)
    with pytest.raises(ValueError, match="'beams', 'kernel', 'heap'"):
        build_tree(torch.zeros(1, 2, 3), 2, builder="fused")


@builders
def test_one_child_per_node_is_the_drafters_argmax_chain(builder, device):
    gen = torch.Generator().manual_seed(11)
    R, D, V = 16, 6, 50
    logits = (torch.randn(R, D, V, generator=gen) * 3).to(device)
    tree = build_tree(logits, D, max_children=1, builder=builder)
    assert tree.num_nodes.tolist() == [D] * R
    assert torch.equal(tree.token_ids, logits.argmax(-1))
    assert torch.equal(tree.parents, torch.arange(D, device=device).expand(R, -1))
    assert torch.equal(tree.depths, torch.arange(1, D + 1, device=device).expand(R, -1))
    # Without the cap the same budget branches: the baseline really differs from the tree.
    assert not torch.equal(build_tree(logits, D, builder=builder).parents, tree.parents)


@pytest.mark.parametrize("R,D,V,B", [(3, 15, 40, 64), (2, 15, 400, 300), (1, 4, 2000, 1024), (0, 3, 5, 8)])
def test_builders_agree_in_every_field(R, D, V, B, device):
    # Budgets whose ancestor rows span several words (and, at 1024, the largest B the adapter takes),
    # every output tensor compared whole: padding slots, unused ancestor rows and the counts included.
    gen = torch.Generator().manual_seed(B)
    logits = (torch.randn(R, D, V, generator=gen) * 2).to(device)
    budgets = torch.randint(0, B + 1, (R,), generator=gen).to(device)
    if R:
        budgets[0] = B
    beams = build_tree(logits, budgets, B, builder="beams")
    for builder in ("kernel", "heap"):
        other = build_tree(logits, budgets, B, builder=builder)
        for name in ("token_ids", "parents", "depths", "scores", "num_nodes", "ancestor_bits"):
            want, got = getattr(beams, name), getattr(other, name)
            assert (got.device, got.dtype) == (want.device, want.dtype), (builder, name)
            assert torch.equal(want, got), (builder, name)
        assert other.max_depth == D


def test_draft_topk_in_row_chunks_equals_one_pass(monkeypatch, device):
    from vllm_ddtree import row_chunks

    logits = (torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(2)) * 3).to(device)
    logits[1, 2] = float("-inf")  # a depth with nothing possible
    one_pass = draft_topk(logits, 6)
    monkeypatch.setattr(row_chunks, "WORKING_SET_BYTES", 4 * 50 * 8)  # four rows at a time
    chunked = draft_topk(logits, 6)
    assert torch.equal(one_pass[0], chunked[0]) and torch.equal(one_pass[1], chunked[1])
    want = torch.log_softmax(logits[0, 0].float(), -1).topk(6)
    torch.testing.assert_close(chunked[0][0, 0], want.values)
    assert torch.isinf(chunked[0][1, 2]).all()


def test_draft_topk_cpu_chunks_equal_one_pass(monkeypatch):
    # On CPU draft_topk works in chunks of a few MiB, never of one row: torch's CPU reduction of a
    # single row splits it over threads, which changes the logsumexp's last bits.
    from vllm_ddtree import tree

    logits = torch.randn(1, 5, 49152, generator=torch.Generator().manual_seed(4)) * 3
    one_pass = draft_topk(logits, 8)
    monkeypatch.setattr(tree, "_CPU_TOPK_WORKING_SET_BYTES", 1)
    assert [s.stop - s.start for s in tree._cpu_row_chunks(5, 49152 * 8)] == [2, 3]
    assert tree._cpu_row_chunks(1, 8) == [slice(0, 1)] and tree._cpu_row_chunks(0, 8) == []
    chunked = draft_topk(logits, 8)
    assert torch.equal(one_pass[0], chunked[0]) and torch.equal(one_pass[1], chunked[1])
