# One command each: `make test` builds the CPU environment (.venv, idempotent) and runs every test;
# `make demo` runs the main job.
PY := .venv/bin/python

.PHONY: env test demo toy bench
env:
	bash scripts/setup_env.sh

test: env
	$(PY) -m pytest -q

# vLLM's CPU guide: Intel OpenMP (and tcmalloc, where installed) preloaded, or speculation loses its speed.
demo: env
	LD_PRELOAD="$$(bash scripts/cpu_preload.sh)" $(PY) -m vllm_ddtree.tools.demo

toy: env
	$(PY) -m vllm_ddtree.tools.toy

bench: env
	$(PY) benchmarks/bench_round.py
