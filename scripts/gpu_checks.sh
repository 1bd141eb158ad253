#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine with torch and triton but no vLLM (the device image):
# the core's tests on the GPU (compiled Triton kernels, CUDA-graph capture, the drafter trainer), then
# the round, tree-attention and whole-step benchmarks. Logs go to $OUT (or ./gpu-out). Usage: bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# Without an install, the kernels folder is reached as vllm_ddtree.kernels through a link.
[[ -e vllm_ddtree/kernels ]] || ln -s ../kernels vllm_ddtree/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/machine.txt"
python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version())" | tee -a "$OUT/machine.txt"

# Deselected: the tests that need vLLM itself (its CPU cache writer, its pinned upload helper).
python3 -m pytest -q -rs -p no:cacheprovider tests/test_tree.py tests/test_verify.py tests/test_kv_commit.py \
    tests/test_tree_attention.py tests/test_cuda_graph.py tests/test_host_sync.py \
    tests/test_train.py::test_trainer_learns_on_the_targets_device \
    --deselect tests/test_kv_commit.py::test_cpu_layouts_are_what_vllm_cpu_writes \
    --deselect tests/test_kv_commit.py::test_commit_on_the_amx_layout_moves_what_it_moves_on_the_vec_layout \
    --deselect tests/test_host_sync.py::test_trees_follow_their_requests_into_the_next_batch_without_a_host_read \
    2>&1 | tee "$OUT/tests.log"

python3 benchmarks/bench_round.py 2>&1 | tee "$OUT/bench_round.log"
python3 benchmarks/bench_tree_attention.py --configs 64/-/-/-/- 64/-/-/-/1 32/-/-/-/- 128/-/-/-/- --context 1024 4096 16384 2>&1 \
    | tee "$OUT/bench_tree_attention.log"
python3 benchmarks/bench_step.py --context 1024 4096 2>&1 | tee "$OUT/bench_step.log"
# The cost of piecewise graphs (attention eager between graphed pieces, as a ddtree engine runs) against
# the full-graph figures above, and the GPU kernels per step.
python3 benchmarks/bench_step.py --graphs piecewise --context 4096 --launches 2>&1 | tee "$OUT/bench_step_piecewise.log"
# What vLLM's Model Runner V2 (vLLM's runner on GPUs) runs: plain and chain in full graphs, trees with
# the drafter, build, verify and commit eager and the target piecewise.
python3 benchmarks/bench_step.py --graphs v2 --context 4096 2>&1 | tee "$OUT/bench_step_v2.log"
