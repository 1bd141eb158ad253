"""vLLM entry point (``vllm.general_plugins``), loaded by vLLM in every process it starts.

:func:`register` makes ``speculative_config={"method": "ddtree", ...}`` valid and hooks vLLM's V1 model
runner, DFlash proposer and attention backends (CPU, FlashAttention, Triton) for ddtree engines; engines with any other method are not
touched. It first checks that every vLLM internal it needs exists and patches nothing unless all do.
Requests that ask for sampling features the tree verifier does not apply are refused on arrival.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM = (">=0.32", "<0.34")

logger = logging.getLogger("vllm_ddtree")


def register() -> None:
    """Called by vLLM's ``load_general_plugins`` in each process; idempotent."""
    try:
        import vllm
    except ImportError:  # the core is usable without vLLM
        return
    from vllm_ddtree.adapter import admission, config, cpu_attention, gpu_attention, proposer_slot

    missing = [what for module in (config, cpu_attention, gpu_attention, proposer_slot, admission)
               for what, present in module.required_internals() if not present]
    if missing:
        raise RuntimeError(f"vllm-ddtree supports vLLM {','.join(SUPPORTED_VLLM)}; this vLLM {vllm.__version__} "
                           f"lacks: {'; '.join(missing)}")
    config.apply()
    proposer_slot.apply()
    cpu_attention.apply()
    gpu_attention.apply()
    admission.apply()
