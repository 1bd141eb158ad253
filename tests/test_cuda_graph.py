"""The round's GPU work captures in one CUDA graph and replays to exactly what it computes eagerly.

GPU only: CUDA graphs do not exist on CPU, so these tests are skipped there (and not counted as run).
A host sync or a data-dependent shape anywhere in draft -> tree -> attention -> verify -> commit makes
the capture raise, which is what these tests would catch.
"""

import pytest
import torch

from vllm_ddtree.kv_commit import commit_accepted_kv, paged_kv_views, plan_commit
from vllm_ddtree.tree import build_tree
from vllm_ddtree.tree_attention import TreeAttentionMetadata, tree_attention
from vllm_ddtree.verify import TreeSampling, verify_tree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

R, DEPTH, VOCAB, BUDGET, PAGE, KV_HEADS, GROUP, HEAD_DIM, CONTEXT = 4, 15, 1000, 32, 16, 2, 4, 64, 100


def _round_inputs(gen):
    dev = "cuda"
    rows = BUDGET + 1
    seq = CONTEXT + rows
    blocks = -(-seq // PAGE) + 1
    return dict(
        draft_logits=(torch.randn(R, DEPTH, VOCAB, generator=gen) * 3).to(dev),
        target_logits=(torch.randn(R, rows, VOCAB, generator=gen) * 3).to(dev),
        query=torch.randn(R * rows, KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(dev, torch.bfloat16),
        kv_cache=torch.randn(R * blocks, KV_HEADS, PAGE, 2 * HEAD_DIM, generator=gen).to(dev, torch.bfloat16),
        block_table=torch.randperm(R * blocks, generator=gen).view(R, blocks).to(dev, torch.int32),
        roots=torch.full((R,), CONTEXT, dtype=torch.int64, device=dev),
    )


def _round(x, out, sampling):
    """One round on fixed buffers: tree, tree attention, verify, KV commit (results written to ``out``)."""
    tree = build_tree(x["draft_logits"], BUDGET)
    rows = BUDGET + 1
    meta = TreeAttentionMetadata(
        query_start_loc=torch.arange(R + 1, device="cuda", dtype=torch.int32) * rows,
        seq_lens=torch.full((R,), CONTEXT + rows, device="cuda", dtype=torch.int32),
        block_table=x["block_table"], tree_bits=tree.ancestor_bits,
        tree_rows=torch.full((R,), rows, device="cuda", dtype=torch.int32))
    keys, values = paged_kv_views(x["kv_cache"], "vllm")
    tree_attention(x["query"], keys, values, meta, HEAD_DIM ** -0.5, out=out["attention"])
    verdict = verify_tree(tree, x["target_logits"], sampling, x["roots"])
    commit_accepted_kv([keys, values], plan_commit(x["block_table"], PAGE, x["roots"], verdict.accepted_nodes))
    out["tokens"].copy_(verdict.output_tokens)
    out["accepted"].copy_(verdict.num_accepted)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_round_replays_in_a_cuda_graph_as_it_runs_eagerly(temperature):
    gen = torch.Generator().manual_seed(0)
    x = _round_inputs(gen)
    # Targets that follow the drafter's top chain (always in a best-first tree), so the walk goes deep
    # and the commit moves KV: at a node of depth d the target picks the drafter's argmax at depth d+1.
    tree = build_tree(x["draft_logits"], BUDGET)
    node_depth = torch.cat([torch.zeros_like(tree.depths[:, :1]), tree.depths], 1).clamp(max=DEPTH - 1)
    favourite = x["draft_logits"].argmax(-1).gather(1, node_depth)  # [R, B+1]
    x["target_logits"].fill_(-10.0).scatter_(2, favourite.unsqueeze(2), 10.0)
    sampling = TreeSampling.uniform(R, temperature, device="cuda")
    cache0 = x["kv_cache"].clone()

    def fresh_out():
        return dict(attention=torch.empty_like(x["query"]),
                    tokens=torch.empty(R, DEPTH + 1, dtype=torch.int64, device="cuda"),
                    accepted=torch.empty(R, dtype=torch.int64, device="cuda"))

    eager = fresh_out()
    _round(x, eager, sampling)
    eager_cache = x["kv_cache"].clone()

    graphed = fresh_out()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x["kv_cache"].copy_(cache0)
        _round(x, graphed, sampling)  # warm-up outside the capture (Triton compiles, allocator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _round(x, graphed, sampling)
    for value in graphed.values():
        value.zero_()
    x["kv_cache"].copy_(cache0)
    graph.replay()
    torch.cuda.synchronize()

    assert eager["accepted"].min() > 1
    assert torch.equal(graphed["tokens"], eager["tokens"])
    assert torch.equal(graphed["accepted"], eager["accepted"])
    assert torch.equal(graphed["attention"], eager["attention"])
    assert torch.equal(x["kv_cache"], eager_cache)
    assert not torch.equal(eager_cache, cache0)


def test_compiled_tree_build_and_walk_equal_eager():
    # torch.compile fuses the build's many small kernels (3x less graphed time on an H200,
    # benchmarks/RESULTS.md); it must not change a single node.
    from vllm_ddtree.tree import build_tree_from_topk, draft_topk
    from vllm_ddtree.verify import walk_tree

    def beams(logp, tokens, budget, max_budget):
        return build_tree_from_topk(logp, tokens, budget, max_budget, builder="beams")

    build = torch.compile(beams, fullgraph=True, dynamic=False)
    walk = torch.compile(walk_tree, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        logits = (torch.randn(8, DEPTH, VOCAB, generator=gen) * 3).to("cuda")
        logp, tokens = draft_topk(logits, 64)
        want, got = beams(logp, tokens, 64, 64), build(logp, tokens, 64, 64)
        for name in ("token_ids", "parents", "depths", "scores", "num_nodes", "ancestor_bits"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        target = torch.randint(0, VOCAB, (8, 65), generator=gen).to("cuda")
        target[:, 0] = want.token_ids[:, 0]  # the first node matches, so walks leave the root
        for a, b in zip(walk(want, target), walk_tree(want, target)):
            assert torch.equal(a, b)


def test_piecewise_graphs_replay_the_step_with_eager_calls_between_pieces():
    # benchmarks/harness.piecewise_graphed (bench_step --graphs piecewise): the pieces replay from
    # their graphs, the yielded calls run eagerly in between and see the pieces' fresh outputs.
    import functools
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from harness import drive, piecewise_graphed

    x = torch.randn(64, 64, device="cuda")
    w = torch.randn(64, 64, device="cuda")
    eager_calls = []

    def counted_sigmoid(h, out):
        eager_calls.append(1)
        torch.sigmoid(h, out=out)

    def step():  # the calls bind their tensors now (a closure would see the generator's later ones)
        h = x @ w
        out = torch.empty_like(h)
        yield functools.partial(counted_sigmoid, h, out)
        h = out @ w + 1
        out2 = torch.empty_like(h)
        yield functools.partial(torch.tanh, h, out=out2)
        return out2.sum(-1)

    replay = piecewise_graphed(step)
    x.copy_(torch.randn(64, 64, device="cuda"))  # new input: the replay must recompute every piece
    calls_before = len(eager_calls)
    got = replay().clone()
    assert len(eager_calls) == calls_before + 1
    torch.testing.assert_close(got, drive(step()))
