"""The main job's demo: SmolLM2-135M-Instruct with the project's DFlash drafter, in vLLM, as a chain
(vLLM's "dflash") and as trees ("ddtree"), on a handful of prompts; prints the answers and tau.

Runs on the machine at hand (vLLM's CPU backend here). ``python -m vllm_ddtree.demo [--budget B]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

PROMPTS = [
    "Write a Python function that returns the squares of a list of numbers.",
    "What is the capital of France?",
    "Give me two tips for writing clear code.",
    "Write a Python function that checks whether a string is a palindrome.",
]
DEFAULT_DRAFTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafters",
                               "smollm2-dflash-b16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.drafter, "config.json")):
        print(f"error: no drafter at {args.drafter} (the repository ships drafters/smollm2-dflash-b16)", file=sys.stderr)
        return 1
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from vllm_ddtree.targets import smollm2_folder

    target = smollm2_folder()
    with open(os.path.join(args.drafter, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = {}
    for name, spec in [("dflash chain", {"method": "dflash", "num_speculative_tokens": depth}),
                       (f"ddtree B={args.budget}", {"method": "ddtree", "num_speculative_tokens": args.budget})]:
        llm = LLM(model=target, dtype="float32", max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.5,
                  disable_log_stats=False, speculative_config={"model": args.drafter, **spec})
        outputs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params, use_tqdm=False)
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        tau = 1 + (metrics["vllm:spec_decode_num_accepted_tokens"] or 0) / metrics["vllm:spec_decode_num_drafts"]
        results[name] = ([o.outputs[0].text for o in outputs], tau)
        del llm
        gc.collect()

    (chain_texts, chain_tau), (tree_texts, tree_tau) = results.values()
    for prompt, answer in zip(PROMPTS, tree_texts):
        print(f"\n> {prompt}\n{answer.strip()}")
    print(f"\ntarget SmolLM2-135M-Instruct, drafter {os.path.basename(args.drafter)} (D = {depth}), greedy, "
          f"{args.max_tokens} new tokens")
    print(f"tau (tokens per target step): dflash chain {chain_tau:.2f}, ddtree B={args.budget} {tree_tau:.2f} "
          f"({tree_tau / chain_tau:.2f}x the chain)")
    print(f"chain and tree answers identical: {'yes' if chain_texts == tree_texts else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
