"""Tokens per second through the OpenAI server, measured with vLLM's own benchmark client
(``vllm bench serve``): no speculation, vLLM's "dflash" chain, ddtree with its default settings and
at fixed budgets (``--fixed-budgets``), on the real pair, at several concurrencies.

Each row starts one server (``python -m vllm.entrypoints.openai.api_server``, the engine in its own
process as in production, prefix caching off, ``--enforce-eager`` unless ``--compile``), and the client
sends the same requests at each concurrency: the last ``--num-prompts`` prompts of the set, as the
client's "custom" dataset (a JSONL file of ``{"prompt": ...}`` rows; the client applies the target's
chat template), greedy, ``--max-tokens`` new tokens each, after one warm-up request. The client's own
figures are reported (output tokens/s, median TTFT and TPOT, and its speculative-decoding block's
acceptance length, which it computes from the server's metrics), with the ratio of tokens/s to no
speculation in the same run.

The client is vLLM's ``vllm.benchmarks.serve`` (``add_cli_args`` and ``main``) called from here: the CPU
build's ``vllm`` console script fails on its distribution name. It needs ``pandas`` (in .venv). On a
CPU run it the way vLLM's CPU guide says (the servers inherit the preload):
``LD_PRELOAD="$(bash scripts/cpu_preload.sh)" .venv/bin/python benchmarks/bench_serve.py``. Absolute
tokens per second count only from a GPU; the ratios are this machine's.

To benchmark a server of your own with the same client, ``client_args`` shows the command line
(``vllm bench serve --backend openai --dataset-name custom --dataset-path prompts.jsonl ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
DEFAULT_DRAFTER = os.path.join(ROOT, "drafters", "smollm2-dflash-b8")


def write_prompts(prompts: list[str], path: str) -> str:
    """The client's "custom" dataset: one ``{"prompt": ...}`` JSON line per prompt."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return path


def client_args(url: str, model: str, dataset: str, concurrency: int, num_prompts: int, max_tokens: int,
                result_dir: str, result_name: str, warmups: int = 1) -> list[str]:
    """``vllm bench serve``'s arguments for one measurement (what a user types after ``vllm bench serve``)."""
    return ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--dataset-name", "custom", "--dataset-path", dataset, "--disable-shuffle",
            "--num-prompts", str(num_prompts), "--custom-output-len", str(max_tokens), "--temperature", "0",
            "--max-concurrency", str(concurrency), "--num-warmups", str(warmups), "--disable-tqdm",
            "--save-result", "--result-dir", result_dir, "--result-filename", result_name]


def run_client(args: list[str]) -> dict:
    """vLLM's benchmark client, in this process; its result dictionary (what ``--save-result`` writes)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return main(parser.parse_args(args))


def rows(depth: int, budget: int, fixed_budgets):
    """(label, speculative config without the drafter) per row; None = no speculation."""
    return [("no spec", None),
            ("dflash", {"method": "dflash", "num_speculative_tokens": depth}),
            (f"ddtree default B<={budget}", {"method": "ddtree", "num_speculative_tokens": budget}),
            *((f"ddtree B={b}", {"method": "ddtree", "num_speculative_tokens": b, "ddtree_budget": "fixed"})
              for b in fixed_budgets)]


def main(argv=None) -> int:
    from bench_acceptance import humaneval_prompts, mtbench_prompts
    from harness import print_header
    from tqdm import tqdm

    from vllm_ddtree.tools.engine_runs import openai_server
    from vllm_ddtree.tools.targets import smollm2_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--set", choices=["humaneval", "mt-bench"], default="humaneval")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--budget", type=int, default=32, help="ddtree's default row: at most B nodes")
    parser.add_argument("--fixed-budgets", type=int, nargs="*", default=[16], help="ddtree rows at a fixed budget")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true", help="let vLLM compile the model (no --enforce-eager)")
    parser.add_argument("--only", nargs="+", default=None, help="row labels to run")
    parser.add_argument("--json", default=None, help="append each measurement to this JSON-lines file")
    args = parser.parse_args(argv)
    with open(os.path.join(args.drafter, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1
    print_header()
    print(f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}")
    target = smollm2_folder()
    prompts = {"humaneval": humaneval_prompts, "mt-bench": mtbench_prompts}[args.set]()[-args.num_prompts:]
    work = tempfile.mkdtemp(prefix="bench_serve_")
    dataset = write_prompts(prompts, os.path.join(work, "prompts.jsonl"))
    server_args = ["--dtype", args.dtype, "--max-model-len", "2048", "--no-enable-prefix-caching",
                   "--max-num-seqs", str(max(args.concurrency)), *([] if args.compile else ["--enforce-eager"])]
    selected = [(label, spec) for label, spec in rows(depth, args.budget, args.fixed_budgets) if not args.only or label in args.only]
    table = {}
    with tqdm(total=len(selected) * len(args.concurrency), desc="measurements", unit="row") as bar:
        for label, spec in selected:
            bar.set_postfix_str(f"starting {label}")
            with openai_server(target, spec and {"model": args.drafter, **spec}, server_args,
                               {"VLLM_CPU_KVCACHE_SPACE": "4"}, startup_timeout=900) as server:
                for c in args.concurrency:
                    bar.set_postfix_str(f"{label}, concurrency {c}")
                    result = run_client(client_args(server.url, target, dataset, c, len(prompts), args.max_tokens,
                                                    work, f"{len(table)}.json"))
                    table[(label, c)] = result
                    base = table.get(("no spec", c))
                    ratio = result["output_throughput"] / base["output_throughput"] if base else None
                    acceptance = result.get("spec_decode_acceptance_length")
                    bar.write(f"{label:>20} c={c:<3} {result['output_throughput']:8.1f} tok/s "
                              f"{f'{ratio:.2f}x' if ratio else '-':>6}  TTFT {result['median_ttft_ms']:7.1f} ms  "
                              f"TPOT {result['median_tpot_ms']:6.1f} ms  acceptance length "
                              f"{f'{acceptance:.2f}' if acceptance else '-'}")
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps({"set": args.set, "concurrency": c, "row": label,
                                                "tokens_per_second": result["output_throughput"],
                                                "vs_no_spec": ratio, "tau": acceptance or 1.0,
                                                "median_ttft_ms": result["median_ttft_ms"],
                                                "median_tpot_ms": result["median_tpot_ms"],
                                                "max_tokens": args.max_tokens, "dtype": args.dtype,
                                                "client": "vllm bench serve",
                                                "drafter": os.path.basename(args.drafter.rstrip("/"))}) + "\n")
                    bar.update()
    print(f"\n{args.set}, last {len(prompts)} prompts, {args.max_tokens} new tokens, greedy, {args.dtype}")
    print(f"{'row':>20} " + " ".join(f"{'c=' + str(c):>26}" for c in args.concurrency))
    for label, _ in selected:
        cells = []
        for c in args.concurrency:
            result, base = table[(label, c)], table.get(("no spec", c))
            ratio = f"{result['output_throughput'] / base['output_throughput']:.2f}x" if base else "-"
            acceptance = result.get("spec_decode_acceptance_length")
            cells.append(f"{result['output_throughput']:7.1f} {ratio:>6} AL {f'{acceptance:.2f}' if acceptance else '-':>5}")
        print(f"{label:>20} " + " ".join(f"{cell:>26}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
