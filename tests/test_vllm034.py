"""ddtree on vLLM 0.34.0, the current release (Model Runner V2 only; "ddtree" registered through its
custom speculative-method interface): live engines of vLLM 0.34's GPU wheel in the second test
environment (.venv-vllm034, built by scripts/setup_env_vllm034.sh, which `make test` runs), on
TRITON_ATTN with every Triton kernel interpreted (tests/emulated_gpu.py), against the same engine
without speculation.

The jobs run once, in one process of that environment (:func:`vllm034`); each test reads its jobs'
results.
"""

import json
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = os.path.join(HERE, os.pardir, os.environ.get("VENV034", ".venv-vllm034"), "bin", "python")

PROMPTS = ["alpha beta", "the tree of draft", "gamma delta token verify commit",
           "commit the draft of a tree and verify the token alpha beta gamma delta"]
GREEDY = [{"temperature": 0, "max_tokens": n, "ignore_eos": True} for n in (32, 12, 24, 16)]
# The sampled-distribution check at a size the interpreted 0.34 engines run in minutes: 200 samples
# (the control is made easy to tell apart by a lower temperature than tests/test_sampling.py's).
SAMPLES = 200


def ddtree(budget: int, **options) -> dict:
    return {"method": "ddtree", "num_speculative_tokens": budget,
            "speculator_options": {"ddtree_budget": "fixed", **options}}


def sampled(spec, temperature, n):
    return {"target": "flat", "prompts": ["alpha beta"] * (SAMPLES // n), "spec": spec,
            "params": [{"temperature": temperature, "max_tokens": 3, "ignore_eos": True, "n": n}] * (SAMPLES // n),
            "engine": {"max_num_seqs": 256}}


def jobs() -> dict:
    greedy = {"target": "context", "prompts": PROMPTS, "params": GREEDY, "engine": {"max_num_seqs": 4}}
    one = {"target": "context", "prompts": PROMPTS[:1], "engine": {"max_num_seqs": 4}}
    return {
        "compatibility": {"check": "compatibility"},
        "plain": {**greedy, "spec": None},
        "fixed4": {**greedy, "spec": ddtree(4)},
        "fixed16": {**greedy, "spec": ddtree(16)},
        "sampled_plain": sampled(None, 1.0, 1), "sampled16": sampled(ddtree(16), 1.0, 2),
        "sampled_colder16": sampled(ddtree(16), 0.3, 2),
        "penalties_refused": {**one, "spec": ddtree(16), "params": [{"max_tokens": 4, "presence_penalty": 1.0}]},
        "unknown_option": {**one, "spec": ddtree(16, ddtree_depth=3), "params": [{"max_tokens": 4}]},
        "cost_aware_refused": {**one, "spec": {**ddtree(16), "speculator_options": {}}, "params": [{"max_tokens": 4}]},
    }


# A V2 runner method ddtree hooks, re-signatured before the plugin loads (still callable as vLLM calls it).
RESIGNATURED = """
from vllm.v1.worker.gpu.model_runner import GPUModelRunner
original = GPUModelRunner.prepare_attn
def prepare_attn(self, input_batch, strict=False):
    return original(self, input_batch)
GPUModelRunner.prepare_attn = prepare_attn
"""


def isolation_jobs() -> dict:
    one = {"target": "context", "prompts": PROMPTS[:1], "params": [{"temperature": 0, "max_tokens": 6,
                                                                    "ignore_eos": True}]}
    return {"none": {**one, "spec": None}, "ddtree": {**one, "spec": ddtree(16)}, "hooks": {"check": "hooks"}}


def run_jobs(models, targets, jobs, root, simulate=""):
    """``jobs`` in one process of the 0.34 environment; their results."""
    assert os.path.exists(PYTHON), ("the vLLM 0.34 test environment is missing: run scripts/setup_env_vllm034.sh "
                                    "(make test does)")
    request, out = root / "jobs.json", root / "results.json"
    named = {name: {**job, "target": targets[job["target"]]} if "target" in job else job for name, job in jobs.items()}
    request.write_text(json.dumps({"target": models[0], "drafter": models[1], "jobs": named, "simulate": simulate}))
    env = {**os.environ, "HOME": str(root), "OMP_NUM_THREADS": "2"}
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    done = subprocess.run([PYTHON, os.path.join(HERE, "emulated_gpu.py"), str(request), str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    assert out.exists(), done.stderr[-6000:]
    results = json.loads(out.read_text())
    assert set(results) == set(jobs), done.stderr[-6000:]
    return results


@pytest.fixture(scope="session")
def vllm034(models, flat, context_target, tmp_path_factory):
    return run_jobs(models, {"context": context_target, "flat": flat[0]}, jobs(), tmp_path_factory.mktemp("vllm034"))


def job(vllm034, name):
    result = vllm034[name]
    assert "error" not in result, result.get("error")
    return result


def test_every_name_the_adapter_uses_matches_vllm_034(vllm034):
    # The conformance check the plugin runs before it patches anything, on the installed 0.34.0: the
    # custom-method interface, Model Runner V2, request admission and the attention backends.
    result = job(vllm034, "compatibility")
    assert result["vllm"] == "0.34.0"
    assert result["tables"] == ["ATTENTION", "CUSTOM_METHOD", "REQUESTS", "V2_RUNNER"]
    assert result["problems"] == []


@pytest.mark.parametrize("name", ["fixed4", "fixed16"])
def test_greedy_equals_the_engine_without_speculation(vllm034, name):
    plain, tree = job(vllm034, "plain"), job(vllm034, name)
    assert tree["tokens"] == plain["tokens"]
    assert len({tuple(t[0][:12]) for t in plain["tokens"]}) == len(PROMPTS)  # every prompt its own answer
    metrics = tree["metrics"]
    assert metrics["vllm:spec_decode_num_draft_tokens"] == int(name[5:]) * metrics["vllm:spec_decode_num_drafts"] > 0
    if name == "fixed16":
        assert metrics["vllm:spec_decode_num_accepted_tokens"] >= 0.5 * metrics["vllm:spec_decode_num_drafts"]
    assert tree["launched"] == ["kv_commit", "merge_splits", "tree_attention", "tree_build"]


def test_sampled_distribution_matches_no_speculation(vllm034):
    from test_sampling import _homogeneity_p

    def pairs(name):
        return [tuple(sample[1:]) for request in job(vllm034, name)["tokens"] for sample in request]

    plain, tree, colder = pairs("sampled_plain"), pairs("sampled16"), pairs("sampled_colder16")
    assert len(plain) == len(tree) == SAMPLES
    assert job(vllm034, "sampled16")["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, colder) < 1e-3


@pytest.mark.parametrize("name,message", [
    ("penalties_refused", "ddtree does not support presence_penalty on vLLM's V2 model runner yet"),
    ("unknown_option", r"method \"ddtree\" takes speculator_options \['ddtree_budget', 'ddtree_step_costs'\]; got "
                       r"\['ddtree_depth'\]"),
    ("cost_aware_refused", "does not support the cost-aware budget on vLLM's V2 model runner yet"),
])
def test_what_ddtree_does_not_serve_on_034_is_refused(vllm034, name, message):
    import re

    assert re.search(message, vllm034[name]["error"])


def test_an_incompatible_vllm_034_keeps_serving_other_engines(models, context_target, tmp_path):
    # As tests/test_plugin.py on 0.32: with an internal ddtree hooks changed, the plugin warns once,
    # patches nothing, registers "ddtree" as a method refused with its message, and every other
    # engine runs.
    results = run_jobs(models, {"context": context_target}, isolation_jobs(), tmp_path, simulate=RESIGNATURED)
    assert len(job(results, "none")["tokens"][0][0]) == 6
    error = results["ddtree"]["error"]
    assert "vllm-ddtree supports vLLM >=0.32,<0.35; on this vLLM (0.34.0) it cannot serve" in error
    assert "GPUModelRunner.prepare_attn takes (self, input_batch, strict), ddtree hooks (self, input_batch)" in error
    assert job(results, "hooks")["hooked"] == [False, False, False]


# Every process of the server (front end, engine core) emulates the GPU engine from its start.
SITECUSTOMIZE = """import os, sys
sys.path.insert(0, {tests!r})
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
import emulated_gpu
emulated_gpu.install()
"""


def test_openai_server_serves_ddtree_on_034(vllm034, models, context_target, tmp_path):
    import urllib.request

    from transformers import AutoTokenizer

    from vllm_ddtree.tools.engine_runs import openai_server

    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(tests=HERE))
    env = {"PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    spec = {"model": models[1], **ddtree(16)}
    args = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4"]

    def post(url, body):
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            return json.loads(answer.read())

    with openai_server(context_target, spec, args, env, startup_timeout=900, python=PYTHON) as server:
        completion = post(server.url + "/v1/completions", {"model": context_target, "prompt": PROMPTS[0],
                                                            "max_tokens": 32, "temperature": 0})
        with urllib.request.urlopen(server.url + "/metrics", timeout=60) as answer:
            metrics = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in answer.read().decode().splitlines()
                       if line.startswith("vllm:spec_decode_num") and "per_pos" not in line}
    plain = job(vllm034, "plain")["tokens"][0][0]  # the same prompt, 32 greedy tokens, without speculation
    assert completion["choices"][0]["text"] == AutoTokenizer.from_pretrained(context_target).decode(plain)
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0
    assert metrics["vllm:spec_decode_num_draft_tokens_total"] == 16 * metrics["vllm:spec_decode_num_drafts_total"]
    assert metrics["vllm:spec_decode_num_accepted_tokens_total"] > 0
