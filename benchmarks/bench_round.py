"""Per-step cost of the DDTree round's bookkeeping: tree build, verify walk, KV commit.

Baseline (same run): the DDTree reference's per-request path, i.e. the top-k moved to the host, a
Python heap per request (tests/reference_heap.py, a port of liranringel/ddtree's build_ddtree_tree),
the walk through per-request child maps after ``.tolist()``, and a per-request ``index_select``
compaction of each layer's cache. The vocabulary pass (log-softmax + top-k) is the same for both and
reported on its own.

Usage: ``python benchmarks/bench_round.py [--requests 1 8 32 64] [--budgets 16 32 64 128]``.
Prints a table and the machine, versions and command; on a GPU times are taken with CUDA events
after warm-up, on CPU with ``time.perf_counter`` (medians). ``build`` is the torch beams
(``builder="beams"``), ``kernel`` the one-launch Triton selection (GPU only; ``ours`` uses it there),
``heap`` the host heap (``builder="heap"``, CPU only; ``ours`` on CPU uses the beams). On a
GPU the column ``graphed`` is the whole round (kernel build + walk + commit) captured in one CUDA graph
and replayed, what a serving step pays; ``gr.beams`` the same with the torch beams, and ``compiled``
(``--compile``) the beams and walk through torch.compile, graphed. Goal (issue 14): ``graphed`` <= 50 us
at R = 64, B = 64 and <= 20 us at R = 1.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from harness import cuda_graphed, print_header, timed  # noqa: E402
from reference_heap import reference_tree  # noqa: E402

from vllm_ddtree.kv_commit import commit_accepted_kv, paged_kv_views, plan_commit  # noqa: E402
from vllm_ddtree.tree import build_tree_from_topk, draft_topk  # noqa: E402
from vllm_ddtree.verify import walk_tree  # noqa: E402

DEPTH = 15
VOCAB = 151936
LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 8, 128, 16


def following_target_tokens(tree, gen):
    """Target tokens that follow the tree at ~80% of nodes, so walks go deep as with a good drafter."""
    R, B = tree.token_ids.shape
    random_tokens = torch.randint(0, VOCAB, (R, B + 1), generator=gen).to(tree.token_ids.device)
    # For each node, the token of one of its children (the last one written wins): a path to follow.
    child_token = random_tokens.clone().scatter_(1, tree.parents, tree.token_ids.clamp(min=0))
    follow = torch.rand(R, B + 1, generator=gen).to(tree.token_ids.device) < 0.8
    return torch.where(follow, child_token, random_tokens)


def reference_round(logp, tokens, budget, target_tokens, caches, roots):
    """The reference's per-request host path: heap, walk, dense compaction."""
    logp, tokens, target = logp.cpu().numpy(), tokens.cpu().numpy(), target_tokens.tolist()
    for r in range(logp.shape[0]):
        nodes = reference_tree(logp[r], tokens[r], budget)
        child_maps = [dict() for _ in range(len(nodes) + 1)]
        for i, (path, parent, _, _) in enumerate(nodes, start=1):
            child_maps[parent][path[-1]] = i
        accepted, current = [0], 0
        while target[r][current] in child_maps[current]:
            current = child_maps[current][target[r][current]]
            accepted.append(current)
        keep = torch.tensor(accepted, device=caches[0].device) + int(roots[r])
        for cache in caches:  # a dense [2, T, heads, head_dim] cache per request, as the reference keeps
            cache[:, int(roots[r]):int(roots[r]) + len(accepted)] = cache.index_select(1, keep)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="also time the graphed round with build and walk through torch.compile (column 'compiled')")
    args = parser.parse_args()
    build, walk = build_tree_from_topk, walk_tree
    if args.compile:
        build = torch.compile(functools.partial(build_tree_from_topk, builder="beams"), fullgraph=True,
                              dynamic=False)
        walk = torch.compile(walk_tree, fullgraph=True, dynamic=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    print_header()
    print(f"D = {DEPTH}, V = {VOCAB}; commit over {LAYERS} layers of {KV_HEADS}x{HEAD_DIM} {dtype}, block {BLOCK_SIZE}")
    print("times per step in microseconds (median); ratio = reference / ours for build+walk+commit\n")
    header = (f"{'R':>3} {'B':>4} {'topk(V)':>9} {'build':>9} {'kernel':>9} {'heap':>9} {'walk':>9} {'commit':>9} "
              f"{'ours':>9} "
              f"{'reference':>10} {'ratio':>7} {'graphed':>9} {'gr.beams':>9}" + (f" {'compiled':>9}" if args.compile else ""))
    print(header)
    for R in args.requests:
        logits = (torch.randn(R, DEPTH, VOCAB, generator=gen) * 4).to(device)
        for B in args.budgets:
            k = min(B, VOCAB)
            t_topk = timed(lambda: draft_topk(logits, k), args.repeats)
            logp, tokens = draft_topk(logits, k)
            tree = build_tree_from_topk(logp, tokens, B, B, builder="beams")
            t_build = timed(lambda: build_tree_from_topk(logp, tokens, B, B, builder="beams"), args.repeats)
            t_kernel = t_heap = None
            if device == "cuda":
                t_kernel = timed(lambda: build_tree_from_topk(logp, tokens, B, B, builder="kernel"), args.repeats)
            else:
                t_heap = timed(lambda: build_tree_from_topk(logp, tokens, B, B, builder="heap"), args.repeats)
            target_tokens = following_target_tokens(tree, gen)
            t_walk = timed(lambda: walk_tree(tree, target_tokens), args.repeats)

            accepted, _ = walk_tree(tree, target_tokens)
            blocks_per_req = (1024 + B) // BLOCK_SIZE + 2
            block_table = torch.arange(R * blocks_per_req, device=device).view(R, blocks_per_req)
            roots = torch.randint(0, 1024, (R,), generator=gen).to(device)
            caches = [torch.randn(R * blocks_per_req, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device=device).to(dtype)
                      for _ in range(LAYERS)]
            views = [view for c in caches for view in paged_kv_views(c, "vllm")]

            def commit():
                commit_accepted_kv(views, plan_commit(block_table, BLOCK_SIZE, roots, accepted))

            t_commit = timed(commit, args.repeats)
            ours = (t_kernel if t_kernel is not None else t_build) + t_walk + t_commit

            dense = [torch.randn(2, 1024 + B + 1, KV_HEADS, HEAD_DIM, device=device).to(dtype) for _ in range(LAYERS)]
            t_ref = timed(lambda: reference_round(logp, tokens, B, target_tokens, dense, roots.cpu()),
                          max(1, args.repeats // 2))
            graphed, graphed_beams, compiled = "-", "-", ""
            if device == "cuda":
                def whole_round(build_fn=build_tree_from_topk, walk_fn=walk_tree):
                    t = build_fn(logp, tokens, B, B)
                    acc, _ = walk_fn(t, target_tokens)
                    commit_accepted_kv(views, plan_commit(block_table, BLOCK_SIZE, roots, acc))

                def graphed_time(fn):
                    try:
                        return f"{timed(cuda_graphed(fn), args.repeats) * 1e6:.0f}"
                    except Exception as err:  # a capture failure is a finding: print it in the table
                        return f"failed: {type(err).__name__}: {err}"[:200]

                graphed = graphed_time(functools.partial(whole_round, functools.partial(build_tree_from_topk,
                                                                                         builder="kernel")))
                graphed_beams = graphed_time(functools.partial(whole_round, functools.partial(build_tree_from_topk,
                                                                                              builder="beams")))
                if args.compile:
                    compiled = " " + f"{graphed_time(lambda: whole_round(build, walk)):>9}"
            kernel = f"{t_kernel * 1e6:.0f}" if t_kernel is not None else "-"
            heap = f"{t_heap * 1e6:.0f}" if t_heap is not None else "-"
            us = [x * 1e6 for x in (t_topk, t_build, t_walk, t_commit, ours, t_ref)]
            print(f"{R:>3} {B:>4} {us[0]:>9.0f} {us[1]:>9.0f} {kernel:>9} {heap:>9} "
                  + " ".join(f"{x:>9.0f}" for x in us[2:5])
                  + f" {us[5]:>10.0f} {t_ref / ours:>6.1f}x {graphed:>9} {graphed_beams:>9}{compiled}", flush=True)


if __name__ == "__main__":
    main()
