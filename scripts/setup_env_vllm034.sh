#!/usr/bin/env bash
# Builds a second test environment, .venv-vllm034, with vLLM 0.34.0 (the current release: Model Runner V2
# only) next to the CPU build of .venv. vLLM 0.34 has no CPU wheel on the registry; its GPU wheel runs
# here with Triton interpreted (tests/emulated_gpu.py, ../shared/notes/gpu-path-on-cpu.md). Idempotent
# (a stamp of this script's inputs); everything from the package registries. About 7 GB, 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV034:-.venv-vllm034}
STAMP="$VENV/.ddtree-env-stamp"
want=$(cat scripts/setup_env_vllm034.sh pyproject.toml setup.py 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# vLLM 0.34.0 pins torch 2.14.0; with its own dependencies (without them `import torch` misses libcudnn).
"$PIP" install -q torch==2.14.0 numpy pytest scipy
# Without its dependencies: a full resolve fails (flashinfer-python 0.7.3 is not on the registry).
"$PIP" install -q --no-deps vllm==0.34.0
# Then vLLM's own requirements, less the GPU-only kernel and media packages, with torch held at 2.14.0.
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'EOF'
import re
from importlib.metadata import requires
gpu_only = {"torch", "torchaudio", "torchvision", "torchcodec", "pynvvideocodec", "flashinfer-python",
            "apache-tvm-ffi", "tilelang", "nvidia-cudnn-frontend", "nvtx", "fastsafetensors", "instanttensor",
            "nvidia-cutlass-dsl", "quack-kernels", "tokenspeed-mla", "humming-kernels"}
for line in requires("vllm"):
    if "extra ==" in line:
        continue
    name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower().replace("_", "-")
    if name not in gpu_only:
        print(line)
EOF
echo "torch==2.14.0" > "$VENV/constraints.txt"
"$PIP" install -q -r "$VENV/vllm-requirements.txt" -c "$VENV/constraints.txt"
"$PIP" install -q --no-deps -e .
# vLLM 0.33.0's wheel, only read (tests/test_compat_source.py checks the adapter's names in its source).
"$PIP" download -q --no-deps vllm==0.33.0 -d "$VENV/wheels"
"$VENV/bin/python" -c "import torch, triton, vllm, vllm_ddtree; print('env ok: torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)"
echo "$want" > "$STAMP"
