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


def print_header() -> None:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"device: {device} ({os.cpu_count()} CPU cores), torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}")
    print(f"command: {' '.join(sys.argv)}")
