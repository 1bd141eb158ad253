"""The README's main job: the real pair in vLLM, chain vs tree, answers identical, trees accept more."""

import re
import subprocess
import sys


def test_demo_runs_the_real_pair():
    run = subprocess.run([sys.executable, "-m", "vllm_ddtree.demo", "--max-tokens", "48"], capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout
    assert "chain and tree answers identical: yes" in run.stdout
    chain, tree = map(float, re.search(r"dflash chain ([\d.]+), ddtree B=32 ([\d.]+)", run.stdout).groups())
    assert tree > chain >= 1.0
