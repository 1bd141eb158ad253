"""vLLM entry point (``vllm.general_plugins``), loaded by vLLM in every process it starts.

:func:`register` makes ``speculative_config={"method": "ddtree", ...}`` valid. It first imports the
whole adapter and compares every vLLM internal the adapter hooks, names and call signatures
(:mod:`vllm_ddtree.adapter.compat`), with the installed vLLM; only then does it patch
(:mod:`vllm_ddtree.adapter`): the patches act only for ddtree engines and cost other engines
nothing on their steps. On a mismatch, or on any failure of our own (a module that does not import,
a check that raises), it logs one warning that says what went wrong and patches nothing but the
refusal of ``"ddtree"``: every other engine runs exactly as without the plugin, and a ddtree config
fails with that message. vLLM calls plugins without catching their errors, so nothing raises out of
:func:`register`.
"""

from __future__ import annotations

SUPPORTED_VLLM = ">=0.32,<0.35"  # the releases the compat tables (vllm_ddtree.adapter.compat) were read from


def register() -> None:
    """Called by vLLM's ``load_general_plugins`` in each process; idempotent; never raises."""
    try:
        import vllm
    except ImportError:  # the core is usable without vLLM
        return
    try:
        problems = _install()
    except Exception as error:  # our own failure: an import, a check, a patch
        problems = [f"setting up the adapter failed ({error!r})"]
    if not problems:
        return
    message = (f"vllm-ddtree supports vLLM {SUPPORTED_VLLM}; on this vLLM ({vllm.__version__}) it cannot serve "
               f'method "ddtree": {"; ".join(problems)}. Method "ddtree" is refused (install a supported vLLM and '
               'reinstall vllm-ddtree, or use method "dflash" with the same drafter); every other engine runs '
               "unchanged.")
    from vllm.logger import init_logger

    logger = init_logger("vllm.ddtree")  # a child of vLLM's logger; warning_once: vLLM may load plugins twice
    logger.warning_once(message)
    try:
        from vllm_ddtree.adapter import compat, config

        if compat.config_front_door_works():
            config.refuse(message)
    except Exception as error:  # then "ddtree" stays unknown to vLLM's config, which refuses it itself
        logger.warning("vllm-ddtree could not install its refusal of method \"ddtree\" either (%r)", error)


def _install() -> list[str]:
    """Imports every module of the adapter, checks vLLM, then patches; returns what does not match."""
    from vllm_ddtree.adapter import admission, compat, config, structured_outputs, v1_runner, v2_runner

    problems = compat.incompatibilities()
    if problems:
        return problems
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner

    config.apply()
    if not compat.has_custom_methods():  # 0.32/0.33: the V1 runner too (0.34 removed it)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        v1_runner.install(GPUModelRunner)
    v2_runner.install(V2ModelRunner)
    structured_outputs.install(Scheduler)
    admission.apply()
    return []
