"""The compatibility tables checked against vLLM's source without importing it
(vllm_ddtree/tools/compat_source.py): vLLM 0.32.0 (this environment's), 0.33.0 (its wheel, downloaded by
scripts/setup_env_vllm034.sh) and 0.34.0 (the second environment's), each with the tables the plugin
would check on it; and a changed signature in the source reported as the plugin reports it."""

import glob
import os

import pytest

from vllm_ddtree.adapter import compat
from vllm_ddtree.tools import compat_source

HERE = os.path.dirname(os.path.abspath(__file__))
VENV034 = os.path.join(HERE, os.pardir, os.environ.get("VENV034", ".venv-vllm034"))


def installed_vllm_032() -> str:
    import importlib.util

    return os.path.dirname(importlib.util.find_spec("vllm").origin)


def releases():
    wheels = glob.glob(os.path.join(VENV034, "wheels", "vllm-0.33.0-*.whl"))
    packages = glob.glob(os.path.join(VENV034, "lib", "python3*", "site-packages", "vllm"))
    return {"0.32.0": installed_vllm_032(), "0.33.0": wheels[0] if wheels else None,
            "0.34.0": packages[0] if packages else None}


@pytest.mark.parametrize("release", ["0.32.0", "0.33.0", "0.34.0"])
def test_every_name_the_adapter_uses_is_in_the_release_source(release):
    path = releases()[release]
    assert path is not None, f"vLLM {release}'s source is missing: run scripts/setup_env_vllm034.sh (make test does)"
    tables, problems, checked = compat_source.check(path)
    assert problems == []
    custom = release == "0.34.0"
    assert tables == sorted(compat.tables(custom_methods=custom)) and checked > 40
    assert ("CUSTOM_METHOD" in tables) == custom and ("V1_RUNNER" in tables) == (not custom)


def test_the_static_check_reports_what_the_runtime_check_reports():
    # On the installed release both agree (no difference), and a parameter renamed in the source is
    # reported in the runtime check's words.
    assert compat.incompatibilities() == []
    source = compat_source.Source(installed_vllm_032())
    name = "vllm/v1/worker/gpu/model_runner.py"
    signature = "def prepare_attn(\n        self, input_batch: InputBatch\n"
    assert signature in source.files[name]
    source.files[name] = source.files[name].replace(signature, signature.replace("input_batch", "batch"))
    path = "vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_attn"
    assert compat_source.mismatch(source, path, compat.V2_RUNNER[path]) == (
        f"{path} takes (self, batch), ddtree hooks (self, input_batch)")
    assert compat_source.mismatch(source, "vllm.v1.worker.gpu.model_runner.GPUModelRunner.no_such_method", None) == (
        "vllm.v1.worker.gpu.model_runner.GPUModelRunner.no_such_method is missing")
