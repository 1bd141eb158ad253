"""A guard that fails on a host read of a device value or a pageable upload of host data (issue 14):
on a GPU each such read stalls the stream, and none can run inside a CUDA graph. Used by the round's
unit tests (test_host_sync.py) and around the adapter's step functions in a live engine
(test_internals.py)."""

import contextlib
import importlib
import importlib.util

import torch


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Raises :class:`HostSync` on a host read or a pageable upload; on a GPU, CUDA's own sync check
    (``set_sync_debug_mode("error")``) runs as well. Host data may go down through vLLM's
    ``async_tensor_h2d`` only (pinned and non-blocking on GPUs; vLLM's CPU build installs its own)."""
    sanctioned = [0]

    def refuse(name):
        def refused(*args, **kwargs):
            raise HostSync(f"{name} reads a device value on the host")
        return refused

    def upload(original, name):
        def guarded(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor) and not sanctioned[0]:
                raise HostSync(f"{name}({type(data).__name__}) uploads host data from pageable memory")
            return original(data, *args, **kwargs)
        return guarded

    def sanction(original):
        def h2d(*args, **kwargs):
            sanctioned[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                sanctioned[0] -= 1
        return h2d

    patches = {(torch.Tensor, name): refuse(f"Tensor.{name}") for name in
               ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")}
    patches[(torch, "tensor")] = upload(torch.tensor, "torch.tensor")
    patches[(torch, "as_tensor")] = upload(torch.as_tensor, "torch.as_tensor")
    torch_utils = importlib.import_module("vllm.utils.torch_utils") if importlib.util.find_spec("vllm") else None
    if torch_utils is not None:
        patches[(torch_utils, "async_tensor_h2d")] = sanction(torch_utils.async_tensor_h2d)
    saved = {key: getattr(*key) for key in patches}
    try:
        for (owner, name), value in patches.items():
            setattr(owner, name, value)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
