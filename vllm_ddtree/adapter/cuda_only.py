"""What only a CUDA device has, behind one switch (:func:`is_cuda`).

Every other choice of a GPU engine's tree step (attention hook, cache layout, KV-commit kernel, tree
builder, split-K, warm-up, memory reservation, step-cost timing) follows the engine's attention
backend (:mod:`vllm_ddtree.adapter.attention`), so a TRITON_ATTN engine emulated on CPU tensors with
Triton's interpreter (tests/emulated_gpu.py) runs exactly the code a GPU engine runs, except this:

* device properties: the multiprocessor count split-K fills. Off CUDA it is a stand-in
  (:data:`STAND_IN_MULTIPROCESSORS`, an H100's), so that an emulated engine makes a GPU's choices;
* synchronization before reading a clock (step-cost timing);
* the device's name (in the step-cost cache key);
* a copy to the host started without waiting for it (:func:`copy_to_host`: the drafts' node counts
  and parents, which V2's scheduler needs after the step).

CUDA graphs and streams are vLLM's own (the adapter sets the graph mode in
:mod:`vllm_ddtree.adapter.config`); none of them runs off CUDA.
"""

from __future__ import annotations

import os

import torch

STAND_IN_MULTIPROCESSORS = 132


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def multiprocessors(device) -> int:
    if is_cuda(device):
        return torch.cuda.get_device_properties(device).multi_processor_count
    return STAND_IN_MULTIPROCESSORS


def synchronize(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if is_cuda(device) else f"cpu x{os.cpu_count()}"


def copy_to_host(x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """``x`` copied to the host, started now, and what to pass to :func:`wait_for` before reading it
    (on CUDA a non-blocking copy into pinned memory and an event recorded after it)."""
    if not is_cuda(x.device):
        return x.to("cpu", copy=True), None
    host = x.to("cpu", non_blocking=True, copy=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def wait_for(event) -> None:
    if event is not None:
        event.synchronize()
