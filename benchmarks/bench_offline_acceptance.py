"""A drafter's acceptance offline, on the target's own greedy answers, next to what the engine will see.

For each set (the trainer's held-out answers, HumanEval, MT-Bench: the target's greedy chat answers in
vLLM, 256 new tokens, cached in ``--data-dir``) it prints chain and tree (``--budget``) tau two ways:
the mean over evenly spaced anchors of what one step accepts (the trainer's cheap checkpoint score),
and the walk: every position scored, each answer stepped through as greedy verification steps (each
step commits what it accepts, the next starts there), which is the engine's tau at T = 0. The two
differ wherever acceptance varies along the text; `benchmarks/RESULTS.md` sets the walk against
`bench_acceptance.py`'s engine figures.

No engine timing here; minutes on two CPU cores (run with Intel OpenMP preloaded, as every CPU figure).

Usage: ``python benchmarks/bench_offline_acceptance.py --drafter drafters/smollm2-dflash-b8``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import print_header  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--sets", nargs="+", default=["held-out", "humaneval", "mt-bench"],
                        choices=["held-out", "humaneval", "mt-bench"])
    parser.add_argument("--data-dir", default=os.path.expanduser("~/.cache/vllm-ddtree/answers"),
                        help="where the greedy answers are kept between runs")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from bench_acceptance import humaneval_prompts, mtbench_prompts
    from transformers import AutoModelForCausalLM

    from vllm_ddtree.tools.targets import smollm2_folder
    from vllm_ddtree.tools.train.dflash import evaluate_drafter, extract_features, load_drafter
    from vllm_ddtree.tools.train.smollm2 import _cached_answers, training_prompts

    os.makedirs(args.data_dir, exist_ok=True)
    target_dir = smollm2_folder()
    prompts = {"held-out": lambda: training_prompts()[::20], "humaneval": humaneval_prompts,
               "mt-bench": mtbench_prompts}
    answers = {name: _cached_answers(os.path.join(args.data_dir, f"{name}-256-bf16.pt"), target_dir, prompts[name](),
                                     256, "bfloat16") for name in args.sets}
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16)
    drafter = load_drafter(args.drafter)
    print_header()
    print(f"drafter {args.drafter} (D = {drafter.c.block_size - 1}); target {target_dir} (bf16); greedy answers, "
          f"256 new tokens at most; tree: B = {args.budget}\n")
    print(f"{'set':>9} {'answers':>7} {'chain mean':>10} {'chain walk':>10} {'tree mean':>9} {'tree walk':>9} "
          f"{'seconds':>7}")
    for name, sequences in answers.items():
        t0 = time.time()
        features = extract_features(target, sequences, drafter.c.target_layer_ids)
        mean = evaluate_drafter(drafter, target, sequences, features, max_anchors=64, tree_budget=args.budget)
        walk = evaluate_drafter(drafter, target, sequences, features, max_anchors=None, tree_budget=args.budget)
        print(f"{name:>9} {len(sequences):>7} {mean['chain_tau']:>10.3f} {walk['chain_tau']:>10.3f} "
              f"{mean['tree_tau']:>9.3f} {walk['tree_tau']:>9.3f} {time.time() - t0:>7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
