"""The README's main job: the real pair in vLLM, no speculation vs chain vs trees (fixed and cost-aware
budget): answers identical, trees accept more, tokens per second reported for every row."""

import re
import subprocess
import sys


def test_demo_runs_the_real_pair():
    run = subprocess.run([sys.executable, "-m", "vllm_ddtree.tools.demo", "--max-tokens", "48"], capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout
    assert "answers identical without speculation, as chain and as trees: yes" in run.stdout
    chain, tree = map(float, re.search(r"dflash chain ([\d.]+), ddtree B=32 ([\d.]+)", run.stdout).groups())
    assert tree > chain >= 1.0
    speeds = re.search(r"no speculation ([\d.]+) \(1.00x\), dflash chain ([\d.]+) \(([\d.]+)x\), "
                       r"ddtree B=32 ([\d.]+) \(([\d.]+)x\), ddtree cost-aware B<=32 ([\d.]+) \(([\d.]+)x\)",
                       run.stdout)
    assert speeds and all(float(v) > 0 for v in speeds.groups())
