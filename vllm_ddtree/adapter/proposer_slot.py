"""Puts :class:`~vllm_ddtree.adapter.proposer.DDTreeProposer` and the runner hooks into vLLM's V1 runner.

The runner builds its drafter as ``DFlashProposer(...)`` by the name imported into
``vllm.v1.worker.gpu_model_runner``; binding that name to our subclass gives ddtree engines the tree
proposer and leaves dflash engines on plain DFlash behaviour (the subclass defers to its parent
when the config has no ddtree flag).
"""

from __future__ import annotations


def required_internals():
    from vllm.v1.worker import gpu_model_runner as runner

    cls = getattr(runner, "GPUModelRunner", None)
    return [
        ("vllm.v1.worker.gpu_model_runner.DFlashProposer", hasattr(runner, "DFlashProposer")),
        ("GPUModelRunner._prepare_inputs", hasattr(cls, "_prepare_inputs")),
        ("GPUModelRunner._sample (calls self.rejection_sampler)", cls is not None and "_sample" in vars(cls)),
    ]


def apply() -> None:
    from vllm.v1.worker import gpu_model_runner as runner_module

    from vllm_ddtree.adapter import runner
    from vllm_ddtree.adapter.proposer import DDTreeProposer

    if runner_module.DFlashProposer is DDTreeProposer:
        return
    runner_module.DFlashProposer = DDTreeProposer
    runner.install(runner_module.GPUModelRunner)
