"""Tensor parallelism (TP = 2 on CPU, dense and MoE targets): output equal to no speculation.

The dense target runs its greedy requests in the structured-outputs batch (its plain rows are the
greedy requests); the MoE target runs under the cost-aware budget, timed on both ranks."""

import json
import os

from tiny_engines import PROMPTS, STRUCTURED, generate, structured_params


def _run_tp_script(tmp_path, target, drafter, *args):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "tensor_parallel_engine.py")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1")
    run = subprocess.run([sys.executable, script, target, drafter, json.dumps(PROMPTS), *args],
                         capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS")]
    assert lines, run.stderr[-3000:]
    return json.loads(lines[0][len("TOKENS"):])


def test_tensor_parallel_moe_greedy_equals_no_speculation(models, moe_target, tmp_path):
    # Two CPU workers, one core each (the CPU build binds one NUMA node per worker by default), with
    # the default (cost-aware) budget timed at start on both ranks; the MoE target's experts are
    # sharded by tensor parallelism. Compared with one unsharded engine without speculation.
    assert _run_tp_script(tmp_path, moe_target, models[1]) == generate((moe_target, models[1]))[0]


def test_tensor_parallel_dense_greedy_and_structured_outputs_equal_no_speculation(models, structured_reference,
                                                                                  tmp_path):
    # A dense target, fixed trees: plain greedy requests and structured outputs in one batch (the
    # drafts' parents travel from the worker processes to the engine core, pickled, which fills the
    # grammar rows); answers as one unsharded engine without speculation gives them.
    constraints = [STRUCTURED[k] if k else None for k in structured_params()[0]]
    assert _run_tp_script(tmp_path, models[0], models[1], json.dumps(constraints)) == structured_reference
