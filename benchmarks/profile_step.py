"""Where a speculative step's time goes: vLLM's "dflash" chain against "ddtree" at the same rows (B = D).

Both engines run the real pair (SmolLM2-135M-Instruct + the project's drafter, bf16, vLLM's CPU
build, in-process) over the same prompts one at a time (concurrency 1) or all at once; timing
wrappers on the runner's stages and on ddtree's own functions add up wall time per stage, divided by
the engine steps. The chain drafts D = 15 tokens (16 rows a step); ddtree verifies B = 15 nodes (16
rows), so any difference in a stage is ddtree's own overhead, not more work for the target.

Stages: ``execute_model`` (the target's forward, with ``_prepare_inputs``, its attention and, for
ddtree, the tree positions and tree attention inside) and ``sample_tokens`` (verification, the KV
commit, the drafter's pass and, for ddtree, the tree build, then vLLM's bookkeeping).

``engine step`` is the whole step as the engine core runs it (scheduling, the drafts handed to the
scheduler, output), ``less the target forward`` its host work: two engines of one process compare
there, where their model forwards drift apart by more than the differences sought.

``--pair skip`` profiles what the cost-aware default costs where no tree pays, against an engine
without speculation: its steps are plain, and its drafter only keeps its context (and probes, after 8,
16, 32, 64 and 128 steps); with ``--measured-costs`` the default runs on the costs it times itself.
Its last line is the default's host work over no speculation's, as a share of the plain step (use
``--max-tokens 1024 --ignore-eos`` for a server's steady state). ``--set`` and ``--temperature``
pick the prompts and sampling.

Usage: ``LD_PRELOAD="$(bash scripts/cpu_preload.sh)" python benchmarks/profile_step.py [--prompts 4]``
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class Stopwatch:
    """Wall seconds and calls per stage; wraps callables in place."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        original = getattr(owner, name)
        label = label or name

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, name, timed)


def instrument(watch: Stopwatch):
    """Wraps the runner's stages (per instance) and ddtree's functions (in their modules)."""
    from vllm_ddtree.adapter import drafter, v1_runner, verifier
    from vllm_ddtree.adapter.attention import cpu

    from vllm_ddtree.tools.engine_runs import model_runner

    for module, name, label in [(drafter, "build_tree", "  build_tree"),
                                (verifier, "verify_tree", "  verify_tree"),
                                (cpu, "commit_accepted_tokens", "  KV commit (all layers)"),
                                (v1_runner, "prepare_tree_step", "  prepare_tree_step"),
                                (cpu, "attend", "  tree attention (all layers)"),
                                (cpu, "plan", "  tree attention plan"),
                                (drafter.DDTreeProposer, "_keep_context", "    context kept"),
                                (drafter.DDTreeProposer, "_write_context", "    context written")]:
        watch.wrap(module, name, label)

    def before(llm):
        runner = model_runner(llm)
        # The whole engine step (schedule, execute, sample, output, and handing drafts to the
        # scheduler), and the target model's forward inside it: what is left is host work, which two
        # engines of one process can compare where their forwards drift apart.
        watch.wrap(llm.llm_engine.engine_core, "get_output", "engine step")
        watch.wrap(runner.model, "forward", "  target forward")
        watch.wrap(runner, "execute_model")
        watch.wrap(runner, "_prepare_inputs", "  layout (_prepare_inputs)")
        watch.wrap(runner, "_build_attention_metadata", "  attention metadata")
        watch.wrap(runner, "sample_tokens")
        watch.wrap(runner, "_bookkeeping_sync", "  bookkeeping")
        if hasattr(runner, "drafter"):  # a speculative engine
            watch.wrap(runner.rejection_sampler, "forward", "  verify (sampler)")
            watch.wrap(runner.drafter, "propose", "  drafter propose")
            # vLLM's own speculative work around the drafter (none of it in an engine without speculation)
            for owner, name in [(runner, "_calc_spec_decode_metadata"), (runner.drafter, "prepare_next_token_ids_padded"),
                                (runner.drafter, "prepare_inputs_padded"), (runner, "take_draft_token_ids"),
                                (llm.llm_engine.engine_core.engine_core.scheduler, "update_draft_token_ids")]:
                watch.wrap(owner, name, f"vLLM spec: {name}")

    return before


def profile(target, drafter, spec, prompts, max_tokens, dtype, concurrency, temperature=0.0, ignore_eos=False):
    from vllm import SamplingParams

    from vllm_ddtree.tools.engine_runs import open_engine

    watch = Stopwatch()
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=ignore_eos)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    with open_engine(target, spec and {"model": drafter, **spec}, dtype=dtype, max_model_len=2048, enforce_eager=True,
                     gpu_memory_utilization=0.5, seed=0) as engine:
        engine.generate(chats[:1], SamplingParams(temperature=0, max_tokens=16), chat=True)  # warm-up
        instrument(watch)(engine.llm)
        tokens = seconds = steps = 0
        for start in range(0, len(chats), concurrency):
            result = engine.generate(chats[start:start + concurrency], params, chat=True)
            tokens, seconds, steps = tokens + result.num_output_tokens, seconds + result.seconds, \
                steps + (result.target_steps or 0)
    per_step = {label: 1e3 * s / watch.calls["execute_model"] for label, s in watch.seconds.items()}
    return per_step, {"tokens": tokens, "seconds": seconds, "verify steps": steps,
                      "engine steps": watch.calls["execute_model"]}


# A cost table under which a second row costs far more than any token is worth: no node ever pays.
NO_NODE_PAYS = {"step": {"1": 0.01, "2": 10.0, "4096": 1e5}, "draft": {"1": 0.0005, "256": 0.0005}}


def main():
    from bench_acceptance import humaneval_prompts, mtbench_prompts
    from harness import print_header

    from vllm_ddtree.tools.demo import DEFAULT_DRAFTER
    from vllm_ddtree.tools.targets import smollm2_folder

    parser = argparse.ArgumentParser()
    parser.add_argument("--set", choices=["humaneval", "mt-bench"], default="humaneval")
    parser.add_argument("--prompts", type=int, default=4, help="prompts, from the end of the set")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every request runs its max tokens (long runs: a server's steady state)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--rounds", type=int, default=2,
                        help="engine pairs, alternating which runs first (this machine's speed drifts between runs)")
    parser.add_argument("--pair", choices=["chain", "skip"], default="chain",
                        help="chain: the chain against ddtree at B = D; skip: no speculation against ddtree's default "
                             "(B <= 32) under a cost table where no node pays: it decodes plainly, its drafter keeps "
                             "its context and probes after 8, 16, 32, 64, 128 steps (what the default costs where "
                             "trees do not pay)")
    parser.add_argument("--measured-costs", action="store_true",
                        help="with --pair skip: the default's own cost model, timed here, instead (it verifies "
                             "trees where that model says they pay, and probes as often as its drafter's cost allows)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with open(os.path.join(args.drafter, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1
    print_header()
    prompts = {"humaneval": humaneval_prompts, "mt-bench": mtbench_prompts}[args.set]()[-args.prompts:]
    if args.pair == "chain":
        specs = {f"dflash D={depth}": {"method": "dflash", "num_speculative_tokens": depth},
                 f"ddtree B={depth}": {"method": "ddtree", "num_speculative_tokens": depth, "ddtree_budget": "fixed"}}
    else:
        default = {"method": "ddtree", "num_speculative_tokens": 32}  # cost-aware, the costs timed here
        specs = {"no spec": None,
                 "ddtree default": default if args.measured_costs else {**default, "ddtree_step_costs": NO_NODE_PAYS}}
    rounds = {label: [] for label in specs}
    for round_ in range(args.rounds):
        for label in list(specs)[:: 1 if round_ % 2 == 0 else -1]:
            rounds[label].append(profile(smollm2_folder(), args.drafter, specs[label], prompts, args.max_tokens,
                                         args.dtype, args.concurrency, args.temperature, args.ignore_eos))
    # Each stage's ms per step over all rounds (every round runs the same steps).
    rows = {label: ({stage: statistics.mean(r[0].get(stage, 0.0) for r in runs) for stage in runs[0][0]},
                    runs[-1][1]) for label, runs in rounds.items()}
    first, second = specs
    print(f"\nstep ms by round ({first} | {second} | ratio): " + "; ".join(
        f"{a[0]['execute_model'] + a[0]['sample_tokens']:.1f} | {b[0]['execute_model'] + b[0]['sample_tokens']:.1f} | "
        f"{(b[0]['execute_model'] + b[0]['sample_tokens']) / (a[0]['execute_model'] + a[0]['sample_tokens']):.3f}x"
        for a, b in zip(*rounds.values())))
    (chain, chain_info), (tree, tree_info) = rows.values()
    print(f"\nms per engine step (mean of {args.rounds} rounds), {args.prompts} {args.set} prompts at concurrency "
          f"{args.concurrency}, T = {args.temperature}, {args.max_tokens} tokens, {args.dtype}; "
          + (f"the same {depth + 1} rows a step" if args.pair == "chain" else "one row a request a step"))
    print(f"{'stage':<32} {first[:8]:>8} {second[:8]:>8} {'diff':>8}")
    # execute_model's stages first (the target's forward, then the others by name), then sample_tokens'.
    sampling = ["  verify (sampler)", "  drafter propose", "    context kept", "    context written", "  bookkeeping"]
    executing = sorted(k for k in tree if k.startswith("  ") and k not in sampling and k != "  target forward")
    for label in ["execute_model", "  target forward", *executing, "sample_tokens", *sampling]:
        a, b = chain.get(label, 0.0), tree.get(label, 0.0)
        print(f"{label:<32} {a:>8.2f} {b:>8.2f} {b - a:>+8.2f}")
    total_a = chain["execute_model"] + chain["sample_tokens"]
    total_b = tree["execute_model"] + tree["sample_tokens"]
    print(f"{'step (execute + sample)':<32} {total_a:>8.2f} {total_b:>8.2f} {total_b - total_a:>+8.2f} "
          f"({total_b / total_a:.3f}x)")
    vllm_spec = [k for k in tree if k.startswith("vLLM spec: ")]
    for label in vllm_spec:
        print(f"{label:<48} {chain.get(label, 0.0):>8.3f} {tree[label]:>8.3f}")
    host_a, host_b = (row["engine step"] - row["  target forward"] for row in (chain, tree))
    print(f"{'engine step':<32} {chain['engine step']:>8.2f} {tree['engine step']:>8.2f} "
          f"{tree['engine step'] - chain['engine step']:>+8.2f}")
    print(f"{'  less the target forward':<32} {host_a:>8.2f} {host_b:>8.2f} {host_b - host_a:>+8.2f}")
    if args.pair == "skip":  # these shares do not drift with the machine: both sides run the same forwards
        print(f"the drafter's pass in the ddtree engine's steps (context only, and its probes): "
              f"{100 * tree['  drafter propose'] / total_b:.2f}% of its step")
        print(f"the default's host work over no speculation's: {host_b - host_a:+.2f} ms a step, "
              f"{100 * (host_b - host_a) / chain['engine step']:+.2f}% of no speculation's engine step")
    for label, runs in rounds.items():
        info = runs[-1][1]
        print(f"{label}: {info}, tok/s by round " + ", ".join(f"{r[1]['tokens'] / r[1]['seconds']:.1f}" for r in runs))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), "rows": {k: v[0] for k, v in rows.items()}}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
