"""One decoding step of a Qwen3-8B-shaped target on a GPU, without vLLM: no speculation, the DFlash
chain and ddtree trees, each captured in a CUDA graph, and the tokens per second they project to.

Target: random bf16 weights made on the device in Qwen3-8B's shapes (36 layers, hidden 4096, 32 query
/ 8 KV heads of 128, MLP 12288, vocabulary 151936), a paged KV cache (blocks of 16) holding each
request's context, attention by the project's tree kernel (causal rows for the plain and chain
steps). Drafter: five DFlash-shaped layers of the same width over the request's context and its
D + 1 block rows, then the LM head over the D draft rows. One step, per request:

* ``plain``: the target over 1 row, LM head, argmax;
* ``chain``: the drafter pass, argmax per depth, the target over D + 1 rows, LM head on all of them,
  the greedy acceptance walk;
* ``tree B``: the drafter pass, ``build_tree`` (top-k, best-first selection, ancestor bits), the
  target over B + 1 rows under the tree mask, LM head on all of them, ``verify_tree``, the commit plan
  and ``commit_accepted_kv`` over every layer's keys and values.

RMSNorm, SiLU MLP and the projections are plain torch; RoPE and q/k norms are left out (a few
element-wise kernels against the step's GEMMs). Each variant is captured once per shape and replayed;
the median of ``--repeats`` replays is reported. ``--graphs`` chooses how: ``full`` (the whole step in
one graph, what full CUDA graphs would give), ``piecewise`` (a graph per piece between attention
calls, each layer's attention launched eagerly from Python in between: how vLLM runs a ddtree
engine's target, whose attention hook decides per step), ``v2`` (what vLLM's Model Runner V2 runs:
plain and chain steps in full graphs, as V2 captures uniform decode batches and DFlash; a tree step
with its drafter pass, tree build, verify and commit eager and the target's forward piecewise:
:func:`v2_tree_seconds`), or ``none`` (eager). ``--launches`` also counts the GPU
kernels and copies of one step of each variant (torch profiler). Projected tokens per second per request set use a
tau per budget (``--tau``; defaults from the DDTree and DFlash papers' Qwen3-8B figures in
``shared/notes``): ``batch * tau / step time``, as ratios to no speculation and to the chain, and the
budget that maximizes it (what the cost-aware rule aims at).

GPU: ``python benchmarks/bench_step.py`` (flags split the grid over several calls). ``--smoke`` runs a
tiny model through the Triton interpreter on CPU, untimed, to check the script.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from harness import count_gpu_ops, cuda_graphed, drive, piecewise_graphed, print_header, timed  # noqa: E402

QWEN3_8B = dict(layers=36, hidden=4096, q_heads=32, kv_heads=8, head_dim=128, mlp=12288, vocab=151936)
TINY = dict(layers=2, hidden=64, q_heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=96)
DRAFT_LAYERS, PAGE = 5, 16
# tau (tokens per target step) per budget at T = 0; "chain" is DFlash's own (HumanEval, B200), the
# budgets DDTree's (MATH-500): different sets, so the projection is indicative only.
DEFAULT_TAU = "chain=6.55,16=8.6,32=9.25,64=9.75,128=10.2"


def make_weights(shape: dict, layers: int, device, dtype, seed: int) -> dict:
    """Random weights made on the device (an 8B model's worth from a host generator takes minutes)."""
    h, q, kv, d, m = shape["hidden"], shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["mlp"]
    gen = torch.Generator(device).manual_seed(seed)

    def w(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype) * size[-1] ** -0.5

    return {"layers": [dict(norm1=torch.ones(h, device=device, dtype=dtype), qkv=w((q + 2 * kv) * d, h),
                            o=w(h, q * d), norm2=torch.ones(h, device=device, dtype=dtype), gate_up=w(2 * m, h),
                            down=w(h, m)) for _ in range(layers)],
            "embed": w(shape["vocab"], h) * 0.02 * h ** 0.5, "head": w(shape["vocab"], h)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * weight


def run_layers(x, weights, caches, meta, slots, shape):
    """The decoder layers over rows ``x [T, hidden]``; each layer writes its K/V at ``slots`` (block,
    offset) of its paged cache before attending, as vLLM's backends do. A generator: it yields each
    layer's attention as a call for the driver to make (:func:`harness.drive` at once,
    :func:`harness.piecewise_graphed` eagerly between graphed pieces) and returns the output rows."""
    from vllm_ddtree.kv_commit import paged_kv_views
    from vllm_ddtree.tree_attention import tree_attention

    q_heads, kv_heads, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    T = x.shape[0]
    for layer, cache in zip(weights["layers"], caches):
        qkv = rms_norm(x, layer["norm1"]) @ layer["qkv"].T
        q, k, v = qkv.split([q_heads * d, kv_heads * d, kv_heads * d], -1)
        keys, values = paged_kv_views(cache, "vllm")
        keys[slots[0], slots[1]] = k.view(T, kv_heads, d)
        values[slots[0], slots[1]] = v.view(T, kv_heads, d)
        attn = torch.empty(T, q_heads, d, device=x.device, dtype=x.dtype)
        yield functools.partial(tree_attention, q.reshape(T, q_heads, d), keys, values, meta, d ** -0.5, out=attn)
        x = x + attn.reshape(T, q_heads * d) @ layer["o"].T
        gate, up = (rms_norm(x, layer["norm2"]) @ layer["gate_up"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ layer["down"].T
    return x


class Batch:
    """The paged layout of ``batch`` requests of ``context`` keys, ``rows`` query rows each."""

    def __init__(self, batch, context, rows, num_blocks, device, gen):
        from vllm_ddtree.tree_attention import TreeAttentionMetadata

        self.batch, self.context, self.rows = batch, context, rows
        blocks = -(-(context + rows) // PAGE)
        assert batch * blocks < num_blocks, "the shared cache is sized for the most rows"
        table = (torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks] + 1).view(batch, blocks)
        self.block_table = table.to(device, torch.int32)
        pos = context + torch.arange(rows, device=device)
        slot_blocks = self.block_table.long().gather(1, (pos // PAGE).expand(batch, rows))
        self.slots = (slot_blocks.flatten(), (pos % PAGE).repeat(batch))
        self.root_positions = torch.full((batch,), context, dtype=torch.int64, device=device)
        self.row_starts = torch.arange(batch, device=device) * rows
        self.meta = TreeAttentionMetadata(
            query_start_loc=(torch.arange(batch + 1, device=device) * rows).to(torch.int32),
            seq_lens=torch.full((batch,), context + rows, dtype=torch.int32, device=device),
            block_table=self.block_table,
            tree_bits=torch.zeros(batch, rows, (rows + 31) // 32, dtype=torch.int32, device=device),
            tree_rows=torch.zeros(batch, dtype=torch.int32, device=device))

    def with_tree(self, tree):
        from dataclasses import replace

        rows = torch.full((self.batch,), self.rows, dtype=torch.int32, device=self.block_table.device)
        return replace(self.meta, tree_bits=tree.ancestor_bits, tree_rows=rows)


def paged_caches(shape, layers, num_blocks, device, dtype):
    return [torch.zeros(num_blocks, shape["kv_heads"], PAGE, 2 * shape["head_dim"], device=device, dtype=dtype)
            for _ in range(layers)]


def step_functions(shape, target, drafter, depth, budgets, batch, context, device, dtype, gen):
    """{name: step over fixed buffers} for one (batch, context): generator functions, as
    :func:`run_layers`. The variants share one target cache and one drafter cache, sized for the most
    rows (each holds a model's KV for the batch)."""
    from vllm_ddtree.kv_commit import paged_kv_views
    from vllm_ddtree.tree import build_tree
    from vllm_ddtree.tree_round import PagedKV, verify_and_commit
    from vllm_ddtree.verify import TreeSampling

    hidden, vocab = shape["hidden"], shape["vocab"]
    embed, head = target["embed"], target["head"]
    num_blocks = batch * -(-(context + max([depth, *budgets]) + 1) // PAGE) + 1
    target_cache = paged_caches(shape, shape["layers"], num_blocks, device, dtype)
    draft_cache = paged_caches(shape, DRAFT_LAYERS, num_blocks, device, dtype)
    sampling = TreeSampling.greedy(batch, device=device)
    steps = {}

    def logits_of(x):
        return x @ head.T

    plain = Batch(batch, context, 1, num_blocks, device, gen)
    ids = torch.randint(0, vocab, (batch,), generator=gen).to(device)
    def plain_step():
        return logits_of((yield from run_layers(embed[ids], target, target_cache, plain.meta, plain.slots,
                                                shape))).argmax(-1)

    steps["plain"] = plain_step

    block = Batch(batch, context, depth + 1, num_blocks, device, gen)
    block_ids = torch.randint(0, vocab, (batch * (depth + 1),), generator=gen).to(device)

    def draft_logits():
        x = yield from run_layers(embed[block_ids], drafter, draft_cache, block.meta, block.slots, shape)
        return logits_of(x.view(batch, depth + 1, hidden)[:, 1:])  # [R, D, V]

    def chain():
        drafts = (yield from draft_logits()).argmax(-1)  # [R, D]
        tokens = torch.cat([block_ids.view(batch, -1)[:, :1], drafts], 1).flatten()
        target_tokens = logits_of((yield from run_layers(embed[tokens], target, target_cache, block.meta,
                                                         block.slots, shape))).argmax(-1).view(batch, depth + 1)
        return torch.cumprod((target_tokens[:, :-1] == drafts).long(), 1).sum(1)

    steps["chain"] = chain
    for budget in budgets:
        tree_batch = Batch(batch, context, budget + 1, num_blocks, device, gen)
        kv = PagedKV([view for c in target_cache for view in paged_kv_views(c, "vllm")], tree_batch.block_table)

        def drafted(budget=budget):
            return build_tree((yield from draft_logits()), budget)

        def target_over(tree, tree_batch=tree_batch, cache=target_cache):
            tokens = torch.cat([block_ids.view(batch, -1)[:, :1], tree.token_ids.clamp(min=0)], 1).flatten()
            return logits_of((yield from run_layers(embed[tokens], target, cache, tree_batch.with_tree(tree),
                                                    tree_batch.slots, shape)))

        def verified(tree, logits, tree_batch=tree_batch, kv=kv):
            return verify_and_commit(tree, logits, sampling, tree_batch.root_positions,
                                     row_starts=tree_batch.row_starts, kv=kv).num_accepted

        def tree_step(drafted=drafted, target_over=target_over, verified=verified):
            # vllm_ddtree.tree_round.tree_round, with both forwards in pieces (generators, for
            # piecewise graphs): draft, tree, the target over the tree, then verify and commit.
            tree = yield from drafted()
            return verified(tree, (yield from target_over(tree)))

        steps[f"tree {budget}"] = tree_step
        steps[f"tree {budget} parts"] = (drafted, target_over, verified)
    return steps


def v2_tree_seconds(parts, repeats: int, graphs: bool) -> float:
    """A tree step as a ddtree engine on vLLM's Model Runner V2 runs it (``--graphs v2``): the drafter's
    pass and the tree build eager (V2 captures DFlash in full graphs only, and a ddtree engine runs
    piecewise), the target's forward in piecewise graphs, the verify and commit eager (the tree
    verifier runs outside vLLM's graphs); each part timed on its own, the sum returned. ``graphs``
    False: the target eager too (the CPU smoke run)."""
    drafted, target_over, verified = parts
    tree = drive(drafted())
    logits = drive(target_over(tree))
    target = piecewise_graphed(functools.partial(target_over, tree)) if graphs else (lambda: drive(target_over(tree)))
    return (timed(lambda: drive(drafted()), repeats) + timed(target, repeats)
            + timed(lambda: verified(tree, logits), repeats))


def parse_tau(text: str) -> dict[str, float]:
    pairs = dict(item.split("=") for item in text.split(","))
    return {("chain" if k == "chain" else f"tree {k}"): float(v) for k, v in pairs.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--depth", type=int, default=15, help="D = the drafter's block size - 1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tau", default=DEFAULT_TAU, help="tau per row: chain=..,<budget>=..")
    parser.add_argument("--graphs", choices=["full", "piecewise", "v2", "none"], default="full",
                        help="the whole step in one CUDA graph, graphs between eager attention calls, vLLM V2's "
                             "modes (plain and chain full; trees: see v2_tree_seconds), or eager")
    parser.add_argument("--launches", action="store_true", help="also count GPU kernels and copies per step")
    parser.add_argument("--smoke", action="store_true", help="tiny model through the interpreter on CPU")
    args = parser.parse_args()
    shape = QWEN3_8B
    if args.smoke:
        shape, args.batch, args.context, args.budgets, args.depth, args.repeats = TINY, [2], [40], [4], 3, 1
        args.graphs = "v2" if args.graphs == "v2" else "none"  # v2: its parts, eager
    elif not torch.cuda.is_available():
        sys.exit("bench_step needs a CUDA GPU for real figures (use --smoke to check the script on CPU)")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tau = parse_tau(args.tau)
    print_header()
    print(f"target {shape}, drafter {DRAFT_LAYERS} layers, D = {args.depth}, {dtype}, KV block {PAGE}; "
          f"{args.graphs} CUDA graphs, median of {args.repeats}; tau {tau}\n")
    target = make_weights(shape, shape["layers"], device, dtype, seed=0)
    drafter = make_weights(shape, DRAFT_LAYERS, device, dtype, seed=1)
    drafter.update(embed=target["embed"], head=target["head"])  # DFlash shares the target's
    names = ["plain", "chain"] + [f"tree {b}" for b in args.budgets]
    print(f"{'batch':>5} {'context':>7} " + " ".join(f"{n + ' ms':>12}" for n in names)
          + "   projected tok/s ratio to plain | to chain, best budget")
    for context in args.context:
        for batch in args.batch:
            gen = torch.Generator().manual_seed(batch * 7 + context)
            try:
                steps = step_functions(shape, target, drafter, args.depth, args.budgets, batch, context, device,
                                       dtype, gen)
                seconds, launches = {}, {}
                for name in names:
                    step = steps[name]
                    if args.graphs == "v2" and name.startswith("tree"):
                        seconds[name] = v2_tree_seconds(steps[f"{name} parts"], args.repeats, device == "cuda")
                    else:
                        if args.graphs == "piecewise":
                            fn = piecewise_graphed(step)
                        else:
                            fn = functools.partial(lambda step: drive(step()), step)
                            fn = cuda_graphed(fn) if args.graphs in ("full", "v2") and device == "cuda" else fn
                        seconds[name] = timed(fn, args.repeats)
                    if args.launches:
                        launches[name] = count_gpu_ops(lambda step=step: drive(step()))
            except torch.OutOfMemoryError:
                print(f"{batch:>5} {context:>7}  out of memory")
                continue
            finally:
                steps = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            speed = {n: batch * tau.get(n, 1.0) / seconds[n] for n in names if n == "plain" or n in tau}
            trees = {n: s for n, s in speed.items() if n.startswith("tree")}
            best = max(trees, key=trees.get) if trees else "-"
            ratios = " ".join(f"{n.split()[-1]}:{speed[n] / speed['plain']:.2f}|"
                              f"{speed[n] / speed['chain']:.2f}" for n in trees if "chain" in speed)
            print(f"{batch:>5} {context:>7} " + " ".join(f"{1e3 * seconds[n]:>12.2f}" for n in names)
                  + f"   chain:{speed.get('chain', 0) / speed['plain']:.2f} {ratios} best {best}")
            if launches:
                print(f"{'':>5} {'':>7} " + " ".join(f"{launches[n]:>9} ops" for n in names) + "   (GPU kernels + copies)")


if __name__ == "__main__":
    main()
