"""The main job's demo: SmolLM2-135M-Instruct with the project's DFlash drafter, in vLLM, without
speculation, as a chain (vLLM's "dflash") and as trees ("ddtree": a fixed budget of B nodes, and the
default cost-aware budget of at most B), on a handful of prompts; prints the answers, tau (tokens per
target step) and tokens per second with the speedup over no speculation.

Runs on the machine at hand (vLLM's CPU backend here). ``python -m vllm_ddtree.tools.demo [--budget B]``.
Tokens per second are generation time only (engine start excluded), after a warm-up prompt; on a CPU
they count only with vLLM's recommended Intel OpenMP runtime preloaded (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PROMPTS = [
    "Write a Python function that returns the squares of a list of numbers.",
    "What is the capital of France?",
    "Give me two tips for writing clear code.",
    "Write a Python function that checks whether a string is a palindrome.",
]
# The repository's drafter (a checkout's drafters/ folder, three levels above this file).
DEFAULT_DRAFTER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "drafters", "smollm2-dflash-b8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.drafter, "config.json")):
        print(f"error: no drafter at {args.drafter} (the repository ships drafters/smollm2-dflash-b8)", file=sys.stderr)
        return 1
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import SamplingParams

    from vllm_ddtree.tools.engine_runs import run_engine
    from vllm_ddtree.tools.targets import smollm2_folder

    target = smollm2_folder()
    with open(os.path.join(args.drafter, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    warmup = [[{"role": "user", "content": "Say hello."}]]
    runs = {}
    tree = {"method": "ddtree", "num_speculative_tokens": args.budget}
    for name, spec in [("no speculation", None),
                       ("dflash chain", {"method": "dflash", "num_speculative_tokens": depth}),
                       (f"ddtree B={args.budget}", {**tree, "ddtree_budget": "fixed"}),
                       (f"ddtree cost-aware B<={args.budget}", tree)]:
        runs[name] = run_engine(target, chats, params, spec and {"model": args.drafter, **spec}, chat=True,
                                warmup=warmup, dtype="float32", max_model_len=2048, enforce_eager=True,
                                gpu_memory_utilization=0.5, disable_log_stats=False)

    plain, chain, tree, costed = runs.values()
    for prompt, output in zip(PROMPTS, tree.outputs):
        print(f"\n> {prompt}\n{output.outputs[0].text.strip()}")
    print(f"\ntarget SmolLM2-135M-Instruct, drafter {os.path.basename(args.drafter)} (D = {depth}), greedy, "
          f"{args.max_tokens} new tokens, {len(PROMPTS)} prompts at once")
    print(f"tau (tokens per target step): dflash chain {chain.tau:.2f}, ddtree B={args.budget} {tree.tau:.2f} "
          f"({tree.tau / chain.tau:.2f}x the chain), ddtree cost-aware {costed.tau:.2f} "
          f"(over the {costed.target_steps or 0} steps that verified a tree)")
    print("tokens per second (generation only): " + ", ".join(
        f"{name} {run.tokens_per_second:.1f} ({run.tokens_per_second / plain.tokens_per_second:.2f}x)"
        for name, run in runs.items()))
    same = plain.tokens == chain.tokens == tree.tokens == costed.tokens
    print(f"answers identical without speculation, as chain and as trees: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
