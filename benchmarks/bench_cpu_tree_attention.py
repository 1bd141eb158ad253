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
from vllm_ddtree.tree_attention import (cpu_kernel, plan_dense, tree_attention_cpu, tree_attention_dense,
                                        uniform_tree_metadata)

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


def vllm_causal(query, cache, meta, scale, isa):
    """vLLM's own CPU attention on the same rows with a causal mask (a chain step's attention), or
    None where vLLM's CPU kernels are not installed."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    R = meta.seq_lens.shape[0]
    blocks, heads, page, _ = cache.shape
    key_cache, value_cache = cache.view(blocks, heads, page * 2, -1).chunk(2, dim=2)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=R, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=meta.seq_lens,
        dtype=query.dtype, query_start_loc=meta.query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    out = torch.empty_like(query)

    def run():
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=meta.block_table, softcap=0.0,
            scheduler_metadata=schedule, s_aux=None)
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[200, 400, 2000])
    parser.add_argument("--page", type=int, default=128, help="KV block size (vLLM's CPU default: 128)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--isa", default="vec", help="vLLM's CPU attention ISA for its own kernel's row")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print_header()
    dtype = getattr(torch, args.dtype)
    print(f"torch threads {torch.get_num_threads()}, KV block size {args.page}, {args.dtype}")
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(BLOCKS, KV_HEADS, args.page, 2 * HEAD_DIM, generator=gen).to(dtype)
    scale = HEAD_DIM ** -0.5
    has_kernel = cpu_kernel() is not None
    print(f"{'R':>3} {'context':>7} | {'kernel':>8} {'tokens':>8} {'blocks':>8} {'vllm':>8} {'masked':>8} "
          f"{'causal':>8} | {'kernel/vllm':>11} {'kernel/floor':>12} {'tokens/floor':>12} {'blocks/floor':>12}")
    for R in args.requests:
        for context in args.context:
            tree = build_tree(torch.randn(R, BUDGET, 16, generator=gen), BUDGET)
            meta = uniform_tree_metadata(tree.ancestor_bits, context, args.page, BLOCKS)
            meta.block_table = torch.randperm(BLOCKS, generator=gen)[: meta.block_table.numel()].view_as(
                meta.block_table).to(torch.int32)  # scattered blocks, as a busy engine's are
            query = torch.randn(R * (BUDGET + 1), HEADS, HEAD_DIM, generator=gen).to(dtype)
            plan = plan_dense(meta, args.page)
            blocks = BlockReads(cache, meta, plan)
            dense = tree_attention_dense(query, cache, "cpu", meta, scale, plan=plan)
            torch.testing.assert_close(blocks(query, cache, scale), dense)
            if has_kernel:
                torch.testing.assert_close(tree_attention_cpu(query, cache, meta, scale), dense,
                                           atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
            S = context + BUDGET + 1
            k = torch.randn(R, KV_HEADS, S, HEAD_DIM, generator=gen).to(dtype)
            v = torch.randn_like(k)
            q = query.view(R, BUDGET + 1, HEADS, HEAD_DIM).transpose(1, 2)
            mask = plan.groups[0][-1]
            causal = torch.ones_like(mask).tril(S - BUDGET - 1)
            candidates = {
                "kernel": (lambda: tree_attention_cpu(query, cache, meta, scale)) if has_kernel else None,
                "tokens": lambda: tree_attention_dense(query, cache, "cpu", meta, scale, plan=plan),
                "blocks": lambda: blocks(query, cache, scale),
                "vllm": vllm_causal(query, cache, meta, scale, args.isa),
                "masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
                "causal": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale,
                                                                 enable_gqa=True)}
            ms = {name: 1e3 * timed(fn, args.repeats) if fn else float("nan") for name, fn in candidates.items()}
            print(f"{R:>3} {context:>7} | " + " ".join(f"{ms[n]:>8.3f}" for n in candidates) + " | "
                  f"{ms['kernel'] / ms['vllm']:>11.2f} {ms['kernel'] / ms['masked']:>12.2f} "
                  f"{ms['tokens'] / ms['masked']:>12.2f} {ms['blocks'] / ms['masked']:>12.2f}")


if __name__ == "__main__":
    main()
