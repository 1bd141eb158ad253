"""benchmarks/bench_step.py --smoke: the GPU step benchmark's whole pipeline (plain, chain and tree
steps over a paged cache, the projection) on a tiny model through the Triton interpreter."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("graphs", ["none", "v2"])  # v2: the tree step timed in its parts (eager on CPU)
def test_step_benchmark_smoke_run_projects_every_row(graphs):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_step.py"), "--smoke",
                          "--graphs", graphs, "--tau", "chain=2,4=3"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    row = next(line.split() for line in run.stdout.splitlines() if line.split()[:2] == ["2", "40"])
    plain, chain, tree = (float(x) for x in row[2:5])
    assert min(plain, chain, tree) > 0
    # Projected ratios follow from the step times and tau: chain 2 / chain time, tree 3 / tree time.
    to_plain, to_chain = (float(x) for x in row[6].removeprefix("4:").split("|"))
    assert abs(float(row[5].removeprefix("chain:")) - 2 * plain / chain) < 0.011
    assert abs(to_plain - 3 * plain / tree) < 0.011 and abs(to_chain - 3 * chain / (2 * tree)) < 0.011
    assert row[-1] == "4"  # the best budget: the only one
