"""The vLLM adapter: the only part of vllm_ddtree that knows vLLM's internals.

``compat``: what of vLLM the adapter hooks (names and signatures), checked before anything is patched.
``config``: ``method: "ddtree"`` in vLLM's config classes (a DFlash drafter plus a tree flag), and the
engine settings a ddtree engine gets. ``options``: the budget and drafter checks; ``support``: the
target and engine-setting refusals; ``admission``: the per-request feature refusals.
``runner``: the V1 model runner's hooks (tree positions and metadata, :class:`~.runner.TreeVerifier`,
KV commit) and the per-runner :class:`~.runner.DDTreeState`. ``proposer``: DFlash's drafter, its
logits turned into trees. ``attention_hook``, ``cpu_attention``, ``gpu_attention``: the target layers'
tree attention on vLLM's CPU backend and on FlashAttention / Triton. :func:`vllm_ddtree.plugin.register`
applies them, all or none.
"""
