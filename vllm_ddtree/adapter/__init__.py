"""The vLLM adapter: the only part of vllm_ddtree that knows vLLM's internals.

The round in vLLM, module by module (one job each):

====================  ======================================================================
``drafter``           1-2. vLLM's DFlash drafter pass; its logits -> trees (``build_tree``, the budget cut)
``step_layout``       3. the step's tree rows: RoPE positions, tree attention metadata, the backend's plan
``attention``         3. the target layers' tree attention, one module per vLLM backend (``cpu``, ``gpu``)
``verifier``          4-5. tree verification in place of vLLM's rejection sampler; the KV commit and
                      the drafter rows' commit
``logits_processing`` 4. vLLM's sampling metadata -> each node's logits processing
``state``             the runner's typed ddtree state, through which those steps hand over
``v1_runner``         where each of them hooks into vLLM's V1 model runner (engine start and each step)
====================  ======================================================================

Around the round: ``options`` (the typed :class:`~.options.DDTreeOptions` and the user-input checks),
``config`` (``method: "ddtree"`` in vLLM's config classes, engine defaults), ``support`` (target and
engine-setting refusals), ``admission`` (per-request refusals), ``structured_outputs`` (the
scheduler's grammar rows per node), ``step_costs`` (the cost-aware budget's cost model), ``memory``
(the tree step's memory in vLLM's profiling run), ``compat`` (every vLLM name the adapter relies on,
checked before anything is patched) and ``patching`` (the one way anything of vLLM is patched).
:func:`vllm_ddtree.plugin.register` applies them, all or none.
"""
