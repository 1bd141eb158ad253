"""benchmarks/plot_results.py: every committed result file of a known kind becomes a figure (the
others are step profiles), and a figure draws what its rows say (one line per method, at the rows'
x values)."""

import glob
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot_results  # noqa: E402


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_throughput_figure_draws_one_line_per_row_and_set(tmp_path, monkeypatch):
    rows = [{"set": s, "concurrency": c, "row": label, "tokens_per_second": speed * c, "tau": 1.0}
            for s in ("humaneval", "mt-bench") for c in (1, 4, 16)
            for label, speed in (("no spec", 30.0), ("dflash (D=7)", 33.0), ("ddtree B=16", 26.0),
                                 ("ddtree cost B<=64", 31.0))]
    figure = plot_results.plot_file(write_rows(tmp_path / "speed.jsonl", rows), str(tmp_path))
    assert figure == str(tmp_path / "speed.png")
    width, height = png_size(figure)
    assert width > 2 * height  # two panels side by side: one per set

    import matplotlib.pyplot as plt

    drawn = {}
    monkeypatch.setattr(plt, "close", lambda fig: drawn.setdefault("figure", fig))
    plot_results.plot_throughput(rows, "t", str(tmp_path / "again.png"))
    axes = drawn["figure"].axes
    assert [ax.get_title() for ax in axes] == ["humaneval", "mt-bench"]
    for ax in axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"no spec", "dflash (D=7)", "ddtree B=16", "ddtree cost B<=64"}
        assert list(lines["ddtree B=16"].get_xdata()) == [1, 4, 16]
        assert list(lines["ddtree B=16"].get_ydata()) == [26.0, 104.0, 416.0]
        assert lines["dflash (D=7)"].get_linestyle() == "--"


def test_acceptance_figure_draws_tau_against_budget_with_the_chain(tmp_path, monkeypatch):
    rows = [{"set": "humaneval", "T": 0.0, "method": m, "tau": tau}
            for m, tau in (("AR", 1.0), ("dflash", 1.49), ("ddtree B=64", 2.21), ("ddtree B=16", 1.92))]
    kept = {}
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig: kept.setdefault("figure", fig))
    figure = plot_results.plot_file(write_rows(tmp_path / "tau.jsonl", rows), str(tmp_path))
    assert png_size(figure)[0] > 0
    lines = {line.get_label(): line for line in kept["figure"].axes[0].get_lines()}
    trees = lines["humaneval, T = 0: ddtree"]
    assert list(trees.get_xdata()) == [16, 64] and list(trees.get_ydata()) == [1.92, 2.21]
    assert list(lines["humaneval, T = 0: dflash"].get_ydata()) == [1.49, 1.49]  # the chain: a flat line


def test_other_results_are_skipped_and_every_committed_result_is_drawn(tmp_path):
    assert plot_results.plot_file(write_rows(tmp_path / "x.jsonl", [{"kernel": "tree", "ms": 1.0}]),
                                  str(tmp_path)) is None
    committed = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.jsonl")))
    assert committed
    for path in committed:
        if plot_results.kind_of(plot_results.read_rows(path)) is None:
            # Step profiles and the cost model against steps are tables in RESULTS.md, not figures.
            assert all("steps" in r or "rows" in r for r in plot_results.read_rows(path)), path
            continue
        figure = plot_results.plot_file(path, str(tmp_path))
        assert figure is not None, path
        name = os.path.basename(figure)
        assert os.path.isfile(os.path.join(ROOT, "docs", "figures", name)), f"{name} is not in docs/figures"


@pytest.mark.parametrize("label,budget", [("ddtree B=16", 16), ("ddtree cost B<=64", None), ("dflash", None)])
def test_budget_of_reads_fixed_budgets_only(label, budget):
    assert plot_results.budget_of(label) == budget
