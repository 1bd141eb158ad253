"""The main job's demo: SmolLM2-135M-Instruct with the project's DFlash drafter, in vLLM, without
speculation, as a chain (vLLM's "dflash") and as trees ("ddtree": a fixed budget of B nodes, and the
default cost-aware budget of at most B), on a handful of prompts.

Speed is measured in bfloat16, the dtype one serves in: tokens per second of the generation alone
(engine start excluded, after a warm-up prompt), the ratio to no speculation, and tau (tokens per
target step). Exactness is checked in float32: there, the answers without speculation, as a chain and
as trees must be identical token for token (they are all the target's greedy output). In bfloat16 they
may part where two tokens' logits tie within bf16's rounding, which depends on the batch's shape (a
verify forward of many rows rounds differently from a one-row decode); the demo says how many did.

``python -m vllm_ddtree.tools.demo [--budget B] [--check none] [--verbose]``. vLLM's own logs go to a
file (its path is printed); ``--verbose`` shows them instead. On a CPU, tokens per second count only
with vLLM's recommended Intel OpenMP runtime preloaded (``make demo`` does; see docs/setup.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time

PROMPTS = [
    "Write a Python function that returns the squares of a list of numbers.",
    "What is the capital of France?",
    "Give me two tips for writing clear code.",
    "Write a Python function that checks whether a string is a palindrome.",
]
# The repository's drafter (a checkout's drafters/ folder, three levels above this file).
DEFAULT_DRAFTER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "drafters", "smollm2-dflash-b8")


@contextlib.contextmanager
def output_to(path: str | None):
    """Everything written to this process's stdout and stderr in the block (vLLM's logs, C++ prints
    included) goes to ``path``; None: nothing is redirected."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def ticking(bar):
    """Refreshes ``bar`` every second in the block, so its elapsed time runs while an engine starts."""
    done = threading.Event()

    def tick():
        while not done.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _native_bf16() -> bool:
    """Whether this machine computes bfloat16 natively: a GPU, or a CPU with AVX-512 BF16 (AMX has it)."""
    import torch

    return torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16", help="the dtype the speed is measured in")
    parser.add_argument("--check", choices=["float32", "none"], default="float32",
                        help="check in float32 that every engine gives the same answers (default), or skip it")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's logs instead of writing them to a file")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.drafter, "config.json")):
        print(f"error: no drafter at {args.drafter} (the repository ships drafters/smollm2-dflash-b8)", file=sys.stderr)
        return 1
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: four requests of at most 2048 tokens
    log_path = None
    if not args.verbose:
        log_path = tempfile.NamedTemporaryFile(prefix="ddtree-demo-", suffix=".log", delete=False).name
    # Progress and results go to the terminal as it is now, whatever happens to the process's own
    # stdout and stderr while engines run.
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    progress = os.fdopen(os.dup(2), "w", buffering=1)
    with output_to(log_path):
        from tqdm import tqdm
        from vllm import SamplingParams

        from vllm_ddtree.tools.engine_runs import run_engine
        from vllm_ddtree.tools.targets import smollm2_folder

        target = smollm2_folder()
    with open(os.path.join(args.drafter, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    warmup = [[{"role": "user", "content": "Say hello."}]]
    tree = {"method": "ddtree", "num_speculative_tokens": args.budget}
    rows = [("no speculation", None),
            ("dflash chain", {"method": "dflash", "num_speculative_tokens": depth}),
            (f"ddtree B={args.budget}", {**tree, "ddtree_budget": "fixed"}),
            (f"ddtree cost-aware B<={args.budget}", tree)]
    checked = args.check == "float32" and args.dtype != "float32"  # float32 speed runs are the check
    jobs = [(args.dtype, row) for row in rows] + ([("float32", row) for row in rows] if checked else [])
    print(f"target SmolLM2-135M-Instruct, drafter {os.path.basename(args.drafter)} (D = {depth}), greedy, "
          f"{args.max_tokens} new tokens, {len(PROMPTS)} prompts at once; {len(jobs)} engines, one after another"
          + (f"; vLLM's logs: {log_path}" if log_path else ""), file=terminal)
    if "libiomp5" not in os.environ.get("LD_PRELOAD", ""):
        print("note: Intel OpenMP is not preloaded, so speculation on vLLM's CPU backend loses speed "
              "(make demo preloads it; docs/setup.md)", file=terminal)
    runs = {}
    started = time.perf_counter()
    with tqdm(total=len(jobs), file=progress, unit="engine", dynamic_ncols=True) as bar:
        for dtype, (name, spec) in jobs:
            bar.set_description(f"{name}, {dtype}")
            # Engines sized for the demo's batch (max_num_seqs): the cost-aware budget times its steps at
            # engine start up to the largest batch the engine may run, seconds for 4 requests, minutes for 256.
            with ticking(bar), output_to(log_path):
                runs[dtype, name] = run_engine(target, chats, params, spec and {"model": args.drafter, **spec},
                                               chat=True, warmup=warmup, dtype=dtype, max_model_len=2048,
                                               enforce_eager=True, gpu_memory_utilization=0.5,
                                               max_num_seqs=len(PROMPTS), disable_log_stats=False)
            bar.update()
        bar.set_description("done")

    speed = {name: runs[args.dtype, name] for name, _ in rows}
    plain, chain, fixed, costed = speed.values()
    for prompt, output in zip(PROMPTS, fixed.outputs):
        print(f"\n> {prompt}\n{output.outputs[0].text.strip()}", file=terminal)
    dtypes = list(dict.fromkeys(dtype for dtype, _ in runs))
    print("\nspeed (generation only; ratio to no speculation; tau = tokens per target step; the cost-aware "
          "row's tau over the steps that verified a tree):", file=terminal)
    print(f"  {'':<26}" + "".join(f"{dtype:<30}" for dtype in dtypes), file=terminal)
    for name, _ in rows:
        cells = []
        for dtype in dtypes:
            run, base = runs[dtype, name], runs[dtype, rows[0][0]]
            cells.append(f"{run.tokens_per_second:7.1f} tok/s {run.tokens_per_second / base.tokens_per_second:5.2f}x"
                         f"  tau {run.tau:.2f}    ")
        print(f"  {name:<26}" + "".join(cells), file=terminal)
    print(f"trees accept {fixed.tau / chain.tau:.2f}x the chain's tokens per target step (B = {args.budget})",
          file=terminal)
    if not costed.target_steps:
        print("the cost-aware budget found no tree that pays here and decoded plainly: its ratio differs from "
              "1.00x by run-to-run drift only", file=terminal)
    if args.dtype == "bfloat16" and not _native_bf16():
        print("note: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), so bfloat16 runs on slower kernels here "
              "and a step's cost grows with its rows, which verification adds (docs/benchmarks.md)", file=terminal)
    parted = sum(any(run.tokens[i] != plain.tokens[i] for run in speed.values()) for i in range(len(PROMPTS)))
    print(f"answers in {args.dtype}: " + ("identical without speculation, as chain and as trees" if not parted else
          f"{parted} of {len(PROMPTS)} part between engines at a near-tie ({args.dtype} rounds differently "
          "for different batch shapes; the float32 check is exact)"), file=terminal)
    if args.check == "float32":
        exact = [runs["float32", name].tokens for name, _ in rows]
        same = all(tokens == exact[0] for tokens in exact)
        print(f"answers identical without speculation, as chain and as trees (float32): {'yes' if same else 'NO'}",
              file=terminal)
    print(f"({time.perf_counter() - started:.0f} s in all)", file=terminal)
    return 0 if args.check == "none" or same else 1


if __name__ == "__main__":
    sys.exit(main())
