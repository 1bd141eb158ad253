"""One layer's tree attention on vLLM's CPU backend: how the paged cache is read, against the SDPA floor.

Per layer, on a cache as vLLM's CPU backend holds it (``"cpu"`` layout, the ``vec`` ISA: 2000 blocks of
``--page`` tokens, 3 KV heads, head dim 64, bf16), R tree requests of ``context`` keys with B + 1 = 8
rows each (9 query heads: SmolLM2-135M's shape):

* ``tokens``: ``tree_attention_dense`` as the engine runs it (its step plan made once; the keys and
  values read token by token through the layout's views, then one masked SDPA per query length);
* ``blocks``: a candidate read: each request's whole blocks with one ``index_select``, then one copy into
  head-major token order, both into buffers made once per step (as the plan would keep them for all
  layers), then the same SDPA;
* ``masked``, ``causal``: torch's SDPA on K/V already contiguous (the floor: no read of the paged cache),
  with the tree mask and with a causal one (a chain's rows).

Prints milliseconds per layer and the ratios. CPU only; run it as vLLM's CPU guide says
(``LD_PRELOAD="$(bash scripts/cpu_preload.sh)"``) and with ``OMP_NUM_THREADS=1`` for the thread count a
vLLM CPU server gives its worker.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from harness import print_header, timed
from vllm_ddtree.kv_commit import paged_kv_views
from vllm_ddtree.tree import build_tree
from vllm_ddtree.tree_attention import plan_dense, tree_attention_dense, uniform_tree_metadata

BLOCKS, KV_HEADS, HEADS, HEAD_DIM, BUDGET = 2000, 3, 9, 64, 7


class BlockReads:
    """The candidate: each group's requests' blocks gathered whole, into buffers kept for the step."""

    def __init__(self, cache, meta, plan):
        page = cache.shape[2]
        self.groups = []
        for rows, blocks, offsets, mask in plan.groups:
            G, S = blocks.shape
            nb = -(-S // page)
            ids = blocks[:, ::page][:, :nb].flatten()  # each request's blocks, in order
            gathered = cache.new_empty((G * nb, *cache.shape[1:]))
            k, v = (cache.new_empty(G, KV_HEADS, nb, page, HEAD_DIM) for _ in range(2))
            self.groups.append((rows, ids, gathered, k, v, S, mask))

    def __call__(self, query, cache, scale):
        out = torch.empty_like(query)
        for rows, ids, gathered, k, v, S, mask in self.groups:
            torch.index_select(cache, 0, ids, out=gathered)
            G = k.shape[0]
            for view, buffer in zip(paged_kv_views(gathered, "cpu"), (k, v)):
                buffer.copy_(view.unflatten(0, (G, -1)).permute(0, 3, 1, 2, 4))  # [G, Hkv, nb, page, D]
            q = query[rows].transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k.flatten(2, 3)[:, :, :S], v.flatten(2, 3)[:, :, :S],
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            out[rows] = o.transpose(1, 2)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[200, 400, 2000])
    parser.add_argument("--page", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print_header()
    print(f"torch threads {torch.get_num_threads()}, KV block size {args.page}")
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(BLOCKS, KV_HEADS, args.page, 2 * HEAD_DIM, generator=gen).to(torch.bfloat16)
    scale = HEAD_DIM ** -0.5
    print(f"{'R':>3} {'context':>7} | {'tokens':>8} {'blocks':>8} {'masked':>8} {'causal':>8} | "
          f"{'tokens/floor':>12} {'blocks/floor':>12} {'tokens/blocks':>13}")
    for R in args.requests:
        for context in args.context:
            tree = build_tree(torch.randn(R, BUDGET, 16, generator=gen), BUDGET)
            meta = uniform_tree_metadata(tree.ancestor_bits, context, args.page, BLOCKS)
            meta.block_table = torch.randperm(BLOCKS, generator=gen)[: meta.block_table.numel()].view_as(
                meta.block_table).to(torch.int32)  # scattered blocks, as a busy engine's are
            query = torch.randn(R * (BUDGET + 1), HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
            plan = plan_dense(meta, args.page)
            blocks = BlockReads(cache, meta, plan)
            torch.testing.assert_close(blocks(query, cache, scale), tree_attention_dense(query, cache, "cpu", meta,
                                                                                           scale, plan=plan))
            S = context + BUDGET + 1
            k = torch.randn(R, KV_HEADS, S, HEAD_DIM, generator=gen).to(torch.bfloat16)
            v = torch.randn_like(k)
            q = query.view(R, BUDGET + 1, HEADS, HEAD_DIM).transpose(1, 2)
            mask = plan.groups[0][-1]
            causal = torch.ones_like(mask).tril(S - BUDGET - 1)
            ms = {name: 1e3 * timed(fn, args.repeats) for name, fn in {
                "tokens": lambda: tree_attention_dense(query, cache, "cpu", meta, scale, plan=plan),
                "blocks": lambda: blocks(query, cache, scale),
                "masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
                "causal": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale,
                                                                 enable_gqa=True)}.items()}
            print(f"{R:>3} {context:>7} | {ms['tokens']:>8.3f} {ms['blocks']:>8.3f} {ms['masked']:>8.3f} "
                  f"{ms['causal']:>8.3f} | {ms['tokens'] / ms['masked']:>12.2f} {ms['blocks'] / ms['masked']:>12.2f} "
                  f"{ms['tokens'] / ms['blocks']:>13.2f}")


if __name__ == "__main__":
    main()
