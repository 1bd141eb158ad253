"""The README's main job: the real pair in vLLM, no speculation vs chain vs trees (fixed and cost-aware
budget): speed for every row, trees accepting more than the chain, answers identical in float32,
progress on stderr and vLLM's logs kept in a file."""

import os
import re
import subprocess
import sys


def test_demo_runs_the_real_pair():
    # In float32: four engines, whose speed runs are also the exactness check (`make demo` adds the same
    # four in bfloat16, which differ only in the dtype vLLM is given). The demo's own KV space (1 GiB),
    # whatever an earlier test left in the environment: its engines run beside other engines' processes.
    run = subprocess.run([sys.executable, "-m", "vllm_ddtree.tools.demo", "--max-tokens", "48", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=1500,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "Paris" in out
    assert "answers identical without speculation, as chain and as trees (float32): yes" in out
    speeds = dict(re.findall(r"^  (no speculation|dflash chain|ddtree B=32|ddtree cost-aware B<=32) +"
                             r"([\d.]+) tok/s", out, re.M))
    assert len(speeds) == 4 and all(float(v) > 0 for v in speeds.values()), out
    taus = dict(re.findall(r"^  (dflash chain|ddtree B=32) .* tau ([\d.]+)", out, re.M))  # float32: exact
    assert float(taus["ddtree B=32"]) > float(taus["dflash chain"]) >= 1.0, out
    assert "answers in float32: identical without speculation, as chain and as trees" in out
    # vLLM's logs went to the file the first line names, not to the output; the progress bar to stderr.
    log = re.search(r"vLLM's logs: (\S+)", out).group(1)
    assert "INFO" not in out and "INFO" in open(log).read()
    assert "4/4" in run.stderr and "INFO" not in run.stderr
