"""Figures from the benchmarks' JSON-lines results, as the field shows them: tokens per second against
concurrency, one line per method (``bench_throughput.py --json``), and tau against the tree budget, one
line per set and temperature with the chain as a dashed line (``bench_acceptance.py --json``).

``python benchmarks/plot_results.py FILE.jsonl [...] [--out docs/figures]``: one PNG per input file,
named after it; the kind of each file is read from its rows. With no files, every JSON-lines file in
``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def kind_of(rows: list[dict]) -> str | None:
    """``"throughput"`` (rows by concurrency), ``"acceptance"`` (rows by method and temperature) or None."""
    if rows and all("concurrency" in r and "tokens_per_second" in r for r in rows):
        return "throughput"
    if rows and all("method" in r and "tau" in r and "T" in r for r in rows):
        return "acceptance"
    return None


def budget_of(label: str) -> int | None:
    """The fixed tree budget a row label names (``"ddtree B=16"`` -> 16); None for anything else."""
    match = re.fullmatch(r"ddtree B=(\d+)", label)
    return int(match.group(1)) if match else None


def _line_style(label: str, budgets: list[int]) -> dict:
    # Plain decoding black, the chain dashed red, fixed trees from light to dark blue by budget, the
    # cost-aware budget (every other ddtree row) thick orange.
    from matplotlib import colormaps

    if label == "no spec":
        return {"color": "black", "linewidth": 2.5}
    if label.startswith("dflash") or "chain" in label:
        return {"color": "tab:red", "linewidth": 2, "linestyle": "--"}
    budget = budget_of(label)
    if budget is not None:
        shade = 0.35 + 0.6 * budgets.index(budget) / max(len(budgets) - 1, 1)
        return {"color": colormaps["Blues"](shade), "linewidth": 1.5}
    return {"color": "tab:orange", "linewidth": 2.5}


def plot_throughput(rows: list[dict], title: str, path: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    # A panel per prompt set, and per temperature where the file has several.
    panels = list(dict.fromkeys((r["set"], r.get("temperature")) for r in rows))
    several = len({temperature for _, temperature in panels}) > 1
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        name = f"{panel[0]}, T = {panel[1]:g}" if several else panel[0]
        lines = defaultdict(list)
        for r in rows:
            if (r["set"], r.get("temperature")) == panel:
                lines[r["row"]].append((r["concurrency"], r["tokens_per_second"]))
        budgets = sorted({budget_of(label) for label in lines if budget_of(label)})
        for label, points in lines.items():
            points.sort()
            ax.plot(*zip(*points), marker="o", label=label, **_line_style(label, budgets))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        concurrencies = sorted({c for points in lines.values() for c, _ in points})
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("output tokens / s")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acceptance(rows: list[dict], title: str, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups = list(dict.fromkeys((r["set"], r["T"]) for r in rows))
    for i, (name, temperature) in enumerate(groups):
        color = f"C{i}"
        group = [r for r in rows if (r["set"], r["T"]) == (name, temperature)]
        trees = sorted((budget_of(r["method"]), r["tau"]) for r in group if budget_of(r["method"]))
        chains = [r for r in group if "chain" in r["method"] or r["method"].startswith("dflash")]
        if trees:
            ax.plot(*zip(*trees), marker="o", color=color, label=f"{name}, T = {temperature:g}: ddtree")
        for chain in chains:
            ax.axhline(chain["tau"], color=color, linestyle="--", linewidth=1.2,
                       label=f"{name}, T = {temperature:g}: {chain['method']}")
    budgets = sorted({budget_of(r["method"]) for r in rows if budget_of(r["method"])})
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("tree budget B (nodes verified per request and step)")
    ax.set_ylabel("tau (tokens per target step)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_file(path: str, out_dir: str) -> str | None:
    """The figure for one results file; its path, or None for a file of another kind."""
    rows = read_rows(path)
    kind = kind_of(rows)
    if kind is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    stem = os.path.splitext(os.path.basename(path))[0]
    figure = os.path.join(out_dir, stem + ".png")
    first = rows[0]
    settings = [f"drafter {first['drafter']}" if first.get("drafter") else None,
                first.get("dtype"), f"{first['max_tokens']} new tokens" if first.get("max_tokens") else None]
    title = f"{stem}: " + ", ".join(s for s in settings if s)
    (plot_throughput if kind == "throughput" else plot_acceptance)(rows, title, figure)
    return figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "figures"))
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(HERE, "results", "*.jsonl")))
    os.makedirs(args.out, exist_ok=True)
    for path in files:
        figure = plot_file(path, args.out)
        print(f"{path} -> {figure}" if figure else f"{path}: not a throughput or acceptance result, skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
