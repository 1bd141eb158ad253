"""Peak extra memory of a tree step's vocabulary-wide work: the tree build and the verify step.

Each phase runs as the vLLM adapter runs it: ``build_tree`` on the drafter's logits ``[R, D, V]``, and
the verify step on vLLM's flat target logits ``[R * (B+1), V]`` (sampled with temperature, top-k and
top-p, vLLM's worst case; and greedy). The figure is the largest number of bytes of tensors alive at
once beyond the phase's inputs, counted by a dispatch mode over every aten op of the phase on the
``meta`` device: nothing is allocated, so configurations far beyond this machine's memory (or any
GPU's, for the baseline) are measured exactly as the code would allocate them. ``--validate`` checks
the count against real allocations at a size that fits (CPU: growth of the peak RSS of a fresh
process, its peak reset before the step). On a GPU, ``--device cuda`` runs the phases for real and reports
``torch.cuda.max_memory_allocated`` beside the count.

Baseline: ``--baseline REF`` measures the package as of git ``REF`` (extracted with ``git archive``) in a
subprocess of the same run; the table shows both and the ratio now / baseline.

Usage: ``python benchmarks/bench_memory.py [--baseline 729a533] [--validate]``
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode that are alive, after every aten op (an
    op's output that shares an input's storage, a view, allocates nothing)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()  # what the previous ops' callers dropped is free before this op allocates
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.storages and storage._cdata not in inputs:
                    self.storages[storage._cdata] = storage
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out

    def _sweep(self):
        for key, storage in list(self.storages.items()):
            if torch._C._storage_Use_Count(key) <= 1:  # only our own reference is left
                self.live -= storage.nbytes()
                del self.storages[key]


def phases(R: int, B: int, D: int, V: int, device: str) -> dict[str, float]:
    """MiB of extra peak per phase, with the ``vllm_ddtree`` that is importable."""
    from vllm_ddtree.tree import build_tree
    from vllm_ddtree.verify import TreeSampling, verify_tree

    in_place = "row_starts" in inspect.signature(verify_tree).parameters  # else: the adapter gathered rows
    draft_logits = torch.randn(R, D, V, dtype=torch.bfloat16, device=device)
    logits = torch.randn(R * (B + 1), V, dtype=torch.bfloat16, device=device)
    roots = torch.zeros(R, dtype=torch.int64, device=device)
    first = torch.arange(R, device=device) * (B + 1)
    out = {}

    def measure(name, fn):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with LiveBytes() as mode:
            result = fn()
        out[name] = mode.peak / MIB
        if device == "cuda":
            torch.cuda.synchronize()
            out[name + " (cuda)"] = (torch.cuda.max_memory_allocated() - base) / MIB
        return result

    tree = measure("build", lambda: build_tree(draft_logits, B))
    for name, sampling in [("verify sampled", TreeSampling.uniform(R, 1.0, top_k=50, top_p=0.9, device=device)),
                           ("verify greedy", TreeSampling.greedy(R, device))]:
        if in_place:
            measure(name, lambda: verify_tree(tree, logits, sampling, roots, row_starts=first))
        else:
            rows = first.unsqueeze(1) + torch.arange(B + 1, device=device)
            measure(name, lambda: verify_tree(tree, logits[rows], sampling, roots))
    return out


def run_all(configs, D, V, device) -> list[dict]:
    return [{"R": R, "B": B, **phases(R, B, D, V, device)} for R, B in configs]


def baseline(ref: str, configs, D, V, device) -> list[dict]:
    """The same measurements on the package as of git ``ref``, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", REPO, "archive", ref, "vllm_ddtree"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        code = (f"import sys, json; sys.path.insert(0, {tmp!r}); sys.path.insert(1, {os.path.dirname(__file__)!r})\n"
                "import vllm_ddtree; assert vllm_ddtree.__file__.startswith(sys.path[0]), vllm_ddtree.__file__\n"
                "from bench_memory import run_all\n"
                f"print('ROWS' + json.dumps(run_all({configs!r}, {D}, {V}, {device!r})))\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ROWS"))[4:])


VALIDATE = """
import json, sys, torch
from vllm_ddtree.tree import build_tree
from vllm_ddtree.verify import TreeSampling, verify_tree

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

R, B, D, V = {R}, {B}, {D}, {V}
tree = build_tree(torch.randn(R, D, V, dtype=torch.bfloat16), B)
logits = torch.randn(R * (B + 1), V, dtype=torch.bfloat16)
sampling = TreeSampling.uniform(R, 1.0, top_k=50, top_p=0.9)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
verify_tree(tree, logits, sampling, torch.zeros(R, dtype=torch.int64), row_starts=torch.arange(R) * (B + 1))
print("REAL" + json.dumps((status("VmHWM") - before) / (1 << 20)))
"""


def validate(R, B, D, V) -> tuple[float, float]:
    """(counted MiB on meta, real peak RSS growth MiB on CPU) of the sampled verify step."""
    code = VALIDATE.format(R=R, B=B, D=D, V=V)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    real = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REAL"))[4:])
    return phases(R, B, D, V, "meta")["verify sampled"], real


def main():
    from harness import print_header

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--depth", type=int, default=15)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"])
    parser.add_argument("--baseline", default=None, help="a git ref to compare with (e.g. the commit before a change)")
    parser.add_argument("--validate", action="store_true", help="compare the count with real CPU allocations first")
    args = parser.parse_args()
    print_header()
    if args.validate:
        for R, B in [(16, 16), (64, 16)]:
            counted, real = validate(R, B, args.depth, args.vocab)
            print(f"validate: sampled verify at R={R}, B={B}, V={args.vocab}: counted {counted:.0f} MiB, "
                  f"real peak RSS growth {real:.0f} MiB ({real / counted:.2f}x)")
    configs = [(R, B) for R in args.requests for B in args.budgets]
    now = run_all(configs, args.depth, args.vocab, args.device)
    base = baseline(args.baseline, configs, args.depth, args.vocab, args.device) if args.baseline else None
    print(f"\nextra peak MiB beyond the inputs (D = {args.depth}, V = {args.vocab}, bf16 logits; device {args.device})"
          + (f"; baseline = git {args.baseline}" if base else ""))
    names = [k for k in now[0] if k not in ("R", "B")]
    header = f"{'R':>4} {'B':>4} " + " ".join(f"{name:>26}" for name in names)
    print(header)
    for i, row in enumerate(now):
        cells = []
        for name in names:
            if base:
                b = base[i].get(name)
                cells.append(f"{b:>9.0f} -> {row[name]:>7.0f} ({row[name] / b:.3f}x)" if b else f"{row[name]:>26.0f}")
            else:
                cells.append(f"{row[name]:>26.0f}")
        print(f"{row['R']:>4} {row['B']:>4} " + " ".join(f"{c:>26}" for c in cells), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
