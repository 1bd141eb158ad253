"""vLLM entry point (``vllm.general_plugins``), loaded by vLLM in every process it starts.

The vLLM adapter that makes ``method: "ddtree"`` valid is not written yet; until it lands, registering
does nothing, so installing the package next to vLLM changes nothing.
"""


def register() -> None:
    """Called by vLLM's ``load_general_plugins``; a no-op until the adapter exists."""
    return None
