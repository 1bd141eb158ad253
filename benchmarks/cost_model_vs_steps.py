"""The cost-aware budget's cost model against the steps the engine then runs.

For each row (no speculation, ddtree at fixed budgets), one engine on the real pair: after a warm-up,
the cost model is timed on that engine as engine start times it (``step_costs.measure``, the same
dummy passes), then the engine generates and every decode step (prefill steps left out) is timed from
``execute_model``'s call to ``sample_tokens``' return. Each step's prediction: C_step(rows) for its
scheduled rows, plus C_draft(requests) where the drafter drafted (every step of a fixed tree; none
without speculation). The table groups steps by requests and rows: measured and predicted ms, and
their ratio. The budget rule needs the *differences* right (a tree step against a plain one of the same
requests), so the last column compares what a tree costs over the plain step of its requests:
measured (tree step - plain step) against predicted.

Usage: ``LD_PRELOAD="$(bash scripts/cpu_preload.sh)" .venv/bin/python benchmarks/cost_model_vs_steps.py
--dtype float32``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    from bench_acceptance import humaneval_prompts, mtbench_prompts
    from harness import print_header
    from vllm import SamplingParams

    from vllm_ddtree.tools.demo import DEFAULT_DRAFTER
    from vllm_ddtree.tools.engine_runs import open_engine
    from vllm_ddtree.tools.step_timing import cost_model_now, predicted_seconds, record_decode_steps
    from vllm_ddtree.tools.targets import smollm2_folder

    parser = argparse.ArgumentParser()
    parser.add_argument("--set", default="humaneval", choices=["humaneval", "mt-bench"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print_header()
    prompts = (humaneval_prompts if args.set == "humaneval" else mtbench_prompts)()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    max_seqs = max(max(args.concurrency), args.prompts)
    # (row, requests) -> [(rows, measured s, predicted s)]
    groups = collections.defaultdict(list)
    tables = {}
    for budget in [None] + args.budgets:
        spec = budget and {"model": args.drafter, "method": "ddtree", "num_speculative_tokens": budget,
                           "ddtree_budget": "fixed"}
        label = f"ddtree B={budget}" if budget else "no spec"
        with open_engine(smollm2_folder(), spec, dtype=args.dtype, max_model_len=2048, enforce_eager=True,
                         gpu_memory_utilization=0.5, seed=0, max_num_seqs=max_seqs,
                         enable_prefix_caching=False) as engine:
            engine.generate([[{"role": "user", "content": "Say hello."}]], SamplingParams(temperature=0, max_tokens=16),
                            chat=True)
            if budget:
                tables[budget] = cost_model_now(engine.llm)
            steps = record_decode_steps(engine.llm)
            for c in args.concurrency:
                chats = [[{"role": "user", "content": p}] for p in prompts[: max(c, args.prompts)]]
                first = len(steps)
                for start in range(0, len(chats), c):
                    engine.generate(chats[start:start + c], params, chat=True)
                for step in steps[first:]:
                    groups[(label, c, step.requests)].append(step)
        print(f"{label}: {sum(len(v) for k, v in groups.items() if k[0] == label)} decode steps timed", flush=True)
    # Plain steps are predicted with every fixed row's table (each engine timed its own; they differ
    # only by this machine's drift); shown with the first budget's.
    print(f"\n{args.set}, {args.max_tokens} tokens, {args.dtype}; ms per decode step (median), model = "
          "C_step(rows) + C_draft(requests) where the drafter drafted")
    print(f"{'row':<14} {'c':>3} {'reqs':>4} {'rows':>5} {'steps':>5} {'measured':>9} {'model':>8} {'ratio':>6} "
          f"{'tree-plain':>10} {'model':>8}")
    records = []
    for (label, c, requests), samples in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        budget = int(label.split("=")[1]) if "=" in label else None
        costs = tables[budget or args.budgets[0]]
        rows = round(statistics.median(s.rows for s in samples))
        measured = statistics.median(s.seconds for s in samples)
        predicted = statistics.median(predicted_seconds(costs, s, drafted=bool(budget)) for s in samples)
        plain = groups.get(("no spec", c, requests))
        extra = extra_model = None
        if budget and plain:
            extra = measured - statistics.median(s.seconds for s in plain)
            extra_model = predicted - float(costs.step[min(requests, costs.step.shape[0] - 1)])
        print(f"{label:<14} {c:>3} {requests:>4} {rows:>5} {len(samples):>5} {1e3 * measured:>9.2f} "
              f"{1e3 * predicted:>8.2f} {predicted / measured:>5.2f}x "
              + (f"{1e3 * extra:>10.2f} {1e3 * extra_model:>8.2f}" if extra is not None else ""))
        records.append({"row": label, "concurrency": c, "requests": requests, "rows": rows, "steps": len(samples),
                        "measured_s": measured, "model_s": predicted, "tree_minus_plain_s": extra,
                        "model_tree_minus_plain_s": extra_model})
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), "steps": records}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
