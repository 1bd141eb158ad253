"""vLLM entry point (``vllm.general_plugins``), loaded by vLLM in every process it starts.

:func:`register` makes ``speculative_config={"method": "ddtree", ...}`` valid. It first compares every
vLLM internal the adapter hooks, names and call signatures (:mod:`vllm_ddtree.adapter.compat`), with
the installed vLLM. On a match it installs the hooks (:mod:`vllm_ddtree.adapter`); they act only for
ddtree engines and cost other engines nothing on their steps. On a mismatch it logs one warning that
names what changed and the supported versions, and patches nothing but the refusal of ``"ddtree"``:
every other engine runs exactly as without the plugin, and a ddtree config fails with that message.
vLLM calls plugins without catching their errors, so nothing here may raise.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.ddtree")  # under vLLM's logger, once vLLM configures it


def register() -> None:
    """Called by vLLM's ``load_general_plugins`` in each process; idempotent."""
    try:
        import vllm
    except ImportError:  # the core is usable without vLLM
        return
    from vllm_ddtree.adapter import compat, config

    try:
        problems = compat.incompatibilities()
    except Exception as error:  # an internal that fails to import is a mismatch too
        problems = [f"reading vLLM's internals failed ({error!r})"]
    if problems:
        message = (f"vllm-ddtree supports vLLM {compat.SUPPORTED_VLLM}; this vLLM ({vllm.__version__}) changed what "
                   f'ddtree hooks: {"; ".join(problems)}. Method "ddtree" is refused (install a supported vLLM, '
                   'or use method "dflash" with the same drafter); every other engine runs unchanged.')
        if not getattr(register, "_warned", False):
            logger.warning(message)
            register._warned = True
        if compat.config_front_door_works():
            config.refuse(message)
        return
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_ddtree.adapter import admission, runner, structured_outputs

    config.apply()
    runner.install(GPUModelRunner)
    structured_outputs.install(Scheduler)
    admission.apply()
