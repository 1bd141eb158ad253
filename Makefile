# One command each: `make test` builds the test environments (.venv and .venv-vllm034, idempotent) and runs
# every test; `make demo` runs the main job.
PY := .venv/bin/python
SHELL := /bin/bash

.PHONY: env env-vllm034 test demo toy bench
env:
	bash scripts/setup_env.sh

# The second environment, vLLM 0.34.0 (Model Runner V2 only), for tests/test_vllm034.py.
env-vllm034:
	bash scripts/setup_env_vllm034.sh

# Both environments at once (each mostly waits on downloads), then every test.
test:
	bash scripts/setup_env.sh & bash scripts/setup_env_vllm034.sh & wait -n && wait -n
	$(PY) -m pytest -q --durations=25

# vLLM's CPU guide: Intel OpenMP (and tcmalloc, where installed) preloaded, or speculation loses its speed.
demo: env
	LD_PRELOAD="$$(bash scripts/cpu_preload.sh)" $(PY) -m vllm_ddtree.tools.demo

toy: env
	$(PY) -m vllm_ddtree.tools.toy

bench: env
	$(PY) benchmarks/bench_round.py
