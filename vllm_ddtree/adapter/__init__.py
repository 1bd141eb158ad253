"""The vLLM adapter: the only part of vllm_ddtree that knows vLLM's internals.

``config`` makes ``method: "ddtree"`` a valid speculative config (a DFlash drafter plus a tree flag),
``proposer`` turns DFlash's per-depth logits into trees, ``runner`` hooks the V1 model runner
(tree positions, tree verification, KV commit) and ``cpu_attention`` gives vLLM's CPU attention the
ancestor mask. :func:`vllm_ddtree.plugin.register` applies them, all or none.
"""
