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


def drive(step):
    """Runs a step generator (see bench_step.run_layers) eagerly: each yielded call is made at once.
    Returns the generator's return value."""
    while True:
        try:
            call = next(step)
        except StopIteration as done:
            return done.value
        call()


def piecewise_graphed(step_fn):
    """vLLM's piecewise CUDA graphs for a step generator function: one graph per piece of GPU work between
    the yielded calls (attention), captured in one memory pool; the replay runs each piece's graph and
    makes each call eagerly from Python in between, as vLLM does around its attention layers, and
    returns the step's result (a tensor of the last piece). The yielded calls must read and write
    tensors that stay put (made in the pieces, kept by the calls)."""
    drive(step_fn())  # warm-up outside the capture: allocator, Triton compiles
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    graphs, calls, result = [], [], None
    pieces = step_fn()
    while not graphs or calls[-1] is not None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            try:
                calls.append(next(pieces))
            except StopIteration as done:
                calls.append(None)
                result = done.value  # made in the last piece: the replay refreshes it
        graphs.append(graph)

    def replay():
        for graph, call in zip(graphs, calls):
            graph.replay()
            if call is not None:
                call()
        return result

    return replay


def count_gpu_ops(fn) -> int:
    """GPU kernels, copies and sets one eager ``fn()`` runs (torch profiler, after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def print_header() -> None:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"device: {device} ({os.cpu_count()} CPU cores), torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}")
    print(f"command: {' '.join(sys.argv)}")
