"""What every benchmark here shares: timing (medians, CUDA events on a GPU) and the header that records
machine, versions and command with every table."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def cuda_graphed(fn):
    """``fn`` captured once in a CUDA graph; returns the graph's replay. Raises if ``fn`` cannot be
    captured (a host sync or a data-dependent shape inside it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: allocator pools, Triton compiles
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def print_header() -> None:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"device: {device} ({os.cpu_count()} CPU cores), torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}")
    print(f"command: {' '.join(sys.argv)}")
