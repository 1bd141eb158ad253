"""Tree attention vs causal flash attention and dense-mask SDPA, per layer call (GPU figures).

For each (batch, context, tree rows N = B+1): every request verifies a random tree of B nodes after a
context of the given length, head dim 128, GQA 8 (32 query heads, 4 KV heads), bf16, block size 16.

Baselines in the same run, same query rows:
  causal : torch SDPA over contiguous K/V with ``is_causal`` on the last N rows (FlashAttention path),
           i.e. what the same rows cost with no tree at all;
  dense  : torch SDPA with the dense boolean tree mask over contiguous K/V (what a port without a tree
           kernel falls back to).
Ratios: tree / causal (goal <= 1.25 at N = 65, context >= 4k) and dense / tree (goal >= 5), for the
kernel's defaults; ``--configs`` adds columns for other launch settings, each written
``block_n/block_q/num_warps/num_stages`` (``-`` keeps a default), e.g. ``64/16/8/3``.

``--smoke`` runs tiny shapes on CPU (through the Triton interpreter) to check the script itself;
its times mean nothing. Absolute figures only from a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import print_header, timed  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

HEAD_DIM, Q_HEADS, KV_HEADS, PAGE = 128, 32, 4, 16


def make_case(batch, context, rows, device, dtype, gen):
    from vllm_ddtree.tree import build_tree
    from vllm_ddtree.tree_attention import TreeAttentionMetadata

    seq = context + rows
    blocks_per_req = -(-seq // PAGE)
    num_blocks = batch * blocks_per_req
    block_table = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_req).to(torch.int32)
    tree = build_tree(torch.randn(batch, 15, 64, generator=gen) * 3, rows - 1)
    meta = TreeAttentionMetadata(
        query_start_loc=(torch.arange(batch + 1) * rows).to(torch.int32),
        seq_lens=torch.full((batch,), seq, dtype=torch.int32),
        block_table=block_table,
        tree_bits=tree.ancestor_bits,
        tree_rows=torch.full((batch,), rows, dtype=torch.int32),
    )
    meta = TreeAttentionMetadata(*[t.to(device) for t in vars(meta).values() if t is not None])
    keys = torch.randn(num_blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    values = torch.randn(num_blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    query = torch.randn(batch * rows, Q_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    # The same keys laid out contiguously per request, for the SDPA baselines: [batch, heads, seq, dim].
    slots = block_table.long().to(device).repeat_interleave(PAGE, 1)[:, :seq] * PAGE + torch.arange(seq, device=device) % PAGE
    flat_k, flat_v = keys.view(-1, KV_HEADS, HEAD_DIM), values.view(-1, KV_HEADS, HEAD_DIM)
    dense_k = flat_k[slots].transpose(1, 2).contiguous()
    dense_v = flat_v[slots].transpose(1, 2).contiguous()
    dense_q = query.view(batch, rows, Q_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    mask = torch.ones(batch, 1, rows, seq, dtype=torch.bool, device=device)
    mask[..., context:] = tree.ancestor_mask().to(device).unsqueeze(1)
    return query, keys, values, meta, dense_q, dense_k, dense_v, mask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 33, 65, 129])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=["64/-/-/-/-", "64/-/-/-/1"],
                        help="launch settings block_n/block_q/num_warps/num_stages/num_splits to time (first: the "
                             "ratios; '-' = the launcher's default, for num_splits its split-K chooser)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run through the interpreter")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.context, args.rows, args.repeats = [2], [64], [17], 1
    elif not torch.cuda.is_available():
        sys.exit("bench_tree_attention needs a CUDA GPU for real figures (use --smoke to check the script on CPU)")
    from vllm_ddtree.tree_attention import tree_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    print_header()
    print(f"head_dim {HEAD_DIM}, {Q_HEADS} query / {KV_HEADS} KV heads, {dtype}, KV block {PAGE}; median of {args.repeats}\n")
    def settings(config):
        names = ("block_n", "block_q", "num_warps", "num_stages", "num_splits")
        return {k: int(v) for k, v in zip(names, config.split("/")) if v != "-"}

    configs = [settings(c) for c in args.configs]
    tiles = "".join(f" {c:>12}" for c in args.configs)
    print(f"{'batch':>5} {'context':>7} {'rows':>4}{tiles} {'causal us':>9} {'dense us':>9} "
          f"{'tree/causal':>11} {'dense/tree':>10}")
    scale = HEAD_DIM ** -0.5
    for batch in args.batch:
        for context in args.context:
            for rows in args.rows:
                try:
                    q, k, v, meta, dq, dk, dv, mask = make_case(batch, context, rows, device, dtype, gen)
                except torch.OutOfMemoryError:
                    print(f"{batch:>5} {context:>7} {rows:>4}  out of memory")
                    continue
                t_trees = [timed(lambda: tree_attention(q, k, v, meta, scale, **c), args.repeats) for c in configs]
                t_tree = t_trees[0]
                # Causal rows at the end of the context: SDPA's bottom-right aligned causal mask.
                causal_bias = causal_lower_right(rows, context + rows)
                t_causal = timed(lambda: F.scaled_dot_product_attention(dq, dk, dv, attn_mask=causal_bias, scale=scale,
                                                                        enable_gqa=True), args.repeats)
                t_dense = timed(lambda: F.scaled_dot_product_attention(dq, dk, dv, attn_mask=mask, scale=scale,
                                                                       enable_gqa=True), args.repeats)
                trees = "".join(f" {t * 1e6:>12.1f}" for t in t_trees)
                print(f"{batch:>5} {context:>7} {rows:>4}{trees} {t_causal * 1e6:>9.1f} "
                      f"{t_dense * 1e6:>9.1f} {t_tree / t_causal:>11.2f} {t_dense / t_tree:>10.2f}", flush=True)
                del q, k, v, meta, dq, dk, dv, mask


if __name__ == "__main__":
    main()
