"""DDTree (Diffusion Draft Tree) speculative decoding for vLLM.

The round, whole, in :func:`vllm_ddtree.tree_round.tree_round`; its steps, one module each: the
drafter's per-depth distributions -> :mod:`vllm_ddtree.tree` (best-first token tree; the budget per
request in :mod:`vllm_ddtree.budget`) -> :mod:`vllm_ddtree.tree_attention` (the ancestor mask over a
paged KV cache; kernels in :mod:`vllm_ddtree.kernels`) -> :mod:`vllm_ddtree.verify` (a target token
per node, with :mod:`vllm_ddtree.node_logits` for request features; the walk) ->
:mod:`vllm_ddtree.kv_commit` (the accepted path's KV made contiguous). This core depends on torch
and triton only. :mod:`vllm_ddtree.adapter` (applied by the entry point :mod:`vllm_ddtree.plugin`) is
the only part of the package that knows vLLM's internals; :mod:`vllm_ddtree.tools` (engine runs, the
demo, the toy, the real target, the drafter trainer) drives vLLM through its public API only, apart
from the tests' window into an in-process engine (:func:`vllm_ddtree.tools.engine_runs.model_runner`).
"""

from vllm_ddtree.tree import DraftTree, build_tree, draft_topk
from vllm_ddtree.tree_round import tree_round

__all__ = ["DraftTree", "build_tree", "draft_topk", "tree_round"]
