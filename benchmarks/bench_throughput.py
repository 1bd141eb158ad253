"""Tokens per second in vLLM: no speculation, vLLM's "dflash" chain, ddtree at fixed budgets and with
the cost-aware budget, at several concurrencies, on the real pair.

Each row is one engine (SmolLM2-135M-Instruct + the project's drafter, ``--dtype`` bf16 by default,
vLLM's CPU build here) that serves every concurrency level and prompt set in turn, after a warm-up
generation: at concurrency c the set's first N prompts (N = max(c, ``--min-prompts``)) go in batches
of c requests at once, each batch finished before the next, so about c requests are in flight.
Reported: output tokens per second of the generation alone (engine start and warm-up excluded; the
median of ``--repeats`` passes, and of ``--rounds`` engines per row, every row in turn, odd rounds
in reverse), tau (tokens per verify step), and the ratio to no speculation in the
same run. Greedy decoding (``--temperature`` samples), ``--max-tokens`` 256, chat-formatted prompts
(HumanEval as "Complete this Python function:" + the signature and docstring; MT-Bench first turns).

Prefix caching is off in every row: the concurrency levels reuse the set's first prompts, and vLLM
drops the last matched block of a cached prefix in engines whose drafter reads the target's hidden
states (dflash, ddtree: ``use_eagle_block_drop``), so with caching on a repeated prompt costs the
speculative rows a block of prefill that plain decoding skips, an artifact of the repetition.

On a CPU run it the way vLLM's CPU guide says (Intel OpenMP preloaded, see the README):
``LD_PRELOAD="$(bash scripts/cpu_preload.sh)" .venv/bin/python benchmarks/bench_throughput.py``.
Absolute tokens per second count only from a GPU; the ratios are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rows(depth: int, budgets, cost_aware: bool):
    """(label, speculative config without the drafter) per row; None = no speculation."""
    out = [("no spec", None)]
    if cost_aware:  # next to no speculation: the rows run one after another, and this machine's speed drifts
        out.append((f"ddtree cost B<={max(budgets)}", {"method": "ddtree", "num_speculative_tokens": max(budgets),
                                                       "ddtree_budget": "cost-aware"}))
    out.append(("dflash", {"method": "dflash", "num_speculative_tokens": depth}))
    out += [(f"ddtree B={b}", {"method": "ddtree", "num_speculative_tokens": b, "ddtree_budget": "fixed"})
            for b in budgets]
    return out


def measure(engine, prompts, concurrency, min_prompts, max_tokens, repeats, temperature=0.0):
    """(tokens per second, tau) over the prompts in batches of ``concurrency``; median of ``repeats``."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    chats = [[{"role": "user", "content": p}] for p in prompts[: max(concurrency, min_prompts)]]
    speeds, taus = [], []
    for _ in range(repeats):
        tokens = seconds = steps = accepted = 0
        for start in range(0, len(chats), concurrency):
            result = engine.generate(chats[start:start + concurrency], params, chat=True)
            tokens += result.num_output_tokens
            seconds += result.seconds
            steps += result.target_steps or 0
            accepted += result.metrics.get("vllm:spec_decode_num_accepted_tokens") or 0
        speeds.append(tokens / seconds)
        taus.append(1 + accepted / steps if steps else 1.0)
    return statistics.median(speeds), statistics.median(taus)


def main():
    from bench_acceptance import humaneval_prompts, mtbench_prompts
    from harness import print_header
    from tqdm import tqdm
    from vllm import SamplingParams

    from vllm_ddtree.tools.demo import DEFAULT_DRAFTER
    from vllm_ddtree.tools.engine_runs import open_engine
    from vllm_ddtree.tools.targets import smollm2_folder

    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=["humaneval", "mt-bench"], choices=["humaneval", "mt-bench"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--no-cost-aware", action="store_true", help="leave out the cost-aware row")
    parser.add_argument("--only", nargs="*", default=None, help="run only the rows with these labels")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy; above 0 sampled (the engine's seed 0 makes runs repeatable)")
    parser.add_argument("--min-prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="engines per row, every row in turn, odd rounds in reverse order; each cell is the "
                             "median of its rounds (this machine's speed drifts between runs)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--json", default=None, help="append each measurement to this JSON-lines file")
    args = parser.parse_args()
    with open(os.path.join(args.drafter, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1
    print_header()
    print(f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}")
    sets = {"humaneval": humaneval_prompts, "mt-bench": mtbench_prompts}
    prompts = {name: sets[name]() for name in args.sets}
    samples = {}  # (set, concurrency, row) -> [(tokens/s, tau)] over the rounds
    selected = [(label, spec) for label, spec in rows(depth, args.budgets, not args.no_cost_aware)
                if not args.only or label in args.only]
    bar = tqdm(total=args.rounds * len(selected) * len(args.sets) * len(args.concurrency), desc="measurements",
               unit="row", dynamic_ncols=True)
    for round_ in range(args.rounds):
        # Odd rounds run the rows in reverse: a drift of the machine's speed then lands on every row alike.
        for label, spec in selected[:: -1 if round_ % 2 else 1]:
            bar.set_postfix_str(f"starting {label}")
            with open_engine(smollm2_folder(), spec and {"model": args.drafter, **spec}, dtype=args.dtype,
                             max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.5, seed=0,
                             max_num_seqs=max(args.concurrency), enable_prefix_caching=False) as engine:
                engine.generate([[{"role": "user", "content": "Say hello."}]],
                                SamplingParams(temperature=0, max_tokens=32), chat=True)
                for name in args.sets:
                    for c in args.concurrency:
                        bar.set_postfix_str(f"{label}, {name}, concurrency {c}")
                        speed, tau = measure(engine, prompts[name], c, args.min_prompts, args.max_tokens,
                                             args.repeats, args.temperature)
                        samples.setdefault((name, c, label), []).append((speed, tau))
                        bar.write(f"round {round_ + 1}: {name:>9} c={c:<3} {label:>18} {speed:>8.1f} tok/s  "
                                  f"tau {tau:5.2f}")
                        bar.update()
    table = {key: (statistics.median(s for s, _ in runs), statistics.median(t for _, t in runs))
             for key, runs in samples.items()}
    if args.json:
        with open(args.json, "a") as f:
            for (name, c, label), (speed, tau) in table.items():
                base = table.get((name, c, "no spec"), (None,))[0]
                f.write(json.dumps({"set": name, "concurrency": c, "row": label, "tokens_per_second": speed,
                                    "tau": tau, "vs_no_spec": speed / base if base else None,
                                    "rounds": [s for s, _ in samples[(name, c, label)]],
                                    "max_tokens": args.max_tokens, "dtype": args.dtype,
                                    "temperature": args.temperature,
                                    "drafter": os.path.basename(args.drafter)}) + "\n")
    bar.close()
    print(f"\ntokens/s (ratio to no speculation), tau; median of {args.rounds} round(s)")
    labels = list(dict.fromkeys(label for _, _, label in table))
    for name in args.sets:
        for c in args.concurrency:
            base = table.get((name, c, "no spec"), (None,))[0]
            cells = []
            for label in labels:
                if (name, c, label) in table:
                    speed, tau = table[(name, c, label)]
                    cells.append(f"{label} {speed:.1f}" + (f" ({speed / base:.2f}x)" if base else "") + f" t{tau:.2f}")
            print(f"{name} c={c}: " + "; ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
