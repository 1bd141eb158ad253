"""DDTree (Diffusion Draft Tree) speculative decoding for vLLM.

A round, module by module: the drafter's per-depth distributions -> :mod:`vllm_ddtree.tree` (best-first
token tree) -> tree attention (ancestor mask) -> :mod:`vllm_ddtree.verify` (target samples, walk) ->
:mod:`vllm_ddtree.kv_commit` (accepted path's KV made contiguous). The core depends on torch and triton
only; :mod:`vllm_ddtree.adapter` (applied by the entry point :mod:`vllm_ddtree.plugin`) is the only
part that knows vLLM.
"""

from vllm_ddtree.tree import DraftTree, build_tree, draft_topk

__all__ = ["DraftTree", "build_tree", "draft_topk"]
