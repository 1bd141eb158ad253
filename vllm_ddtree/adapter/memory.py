"""The tree step's memory, reserved in vLLM's profiling run (engine start).

vLLM sizes the KV cache from the peak memory of its profiling run, which samples one draft per
request with the chain sampler: a tree step's build (``[R, D, V]`` top-k) and verification (every
node's processed distribution, in bounded row chunks) peak higher. A ddtree runner therefore runs
:func:`reserve_tree_step_memory` inside that profiling run, right after vLLM's dummy sampler run, so
that the KV cache leaves room for the largest tree step the scheduler can form.
"""

from __future__ import annotations

import torch

from vllm_ddtree.tree import build_tree
from vllm_ddtree.verify import TreeSampling, verify_tree


def reserve_tree_step_memory(max_num_seqs: int, max_num_batched_tokens: int, budget: int, depth: int, vocab: int,
                             dtype: torch.dtype, device, builder: str | None) -> tuple[int, int]:
    """Drafts (with the engine's tree builder, ``builder`` as :func:`~vllm_ddtree.tree.build_tree`'s)
    and verifies the largest tree step the scheduler can form, on random logits; returns (requests
    drafted, trees verified). A step verifies at most ``max_num_batched_tokens`` rows."""
    drafted = max_num_seqs
    verified = max(1, min(max_num_seqs, max_num_batched_tokens // (budget + 1)))
    logits = torch.randn(drafted, depth, vocab, dtype=dtype, device=device)
    tree = build_tree(logits, budget, builder=builder).take(slice(verified))
    logits = torch.randn(verified * (budget + 1), vocab, dtype=dtype, device=device)
    sampling = TreeSampling.uniform(verified, temperature=1.0, top_k=vocab // 2, top_p=0.9, min_p=0.1, device=device)
    verify_tree(tree, logits, sampling, torch.zeros(verified, dtype=torch.int64, device=device),
                row_starts=torch.arange(verified, device=device) * (budget + 1))
    return drafted, verified
