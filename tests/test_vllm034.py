"""ddtree on vLLM 0.34.0, the current release (Model Runner V2 only; "ddtree" registered through its
custom speculative-method interface): live engines of vLLM 0.34's GPU wheel in the second test
environment (.venv-vllm034, built by scripts/setup_env_vllm034.sh, which `make test` runs), on
TRITON_ATTN with our Triton kernels interpreted (tests/emulated_gpu.py), against the same engine
without speculation: the batch of every request feature of tests/emulated_jobs.py at two fixed
budgets and under the cost-aware budget, the sampled distribution, the conformance check, an
unknown option refused, an incompatible vLLM that keeps other engines serving, and the OpenAI server.

The jobs run in one process of that environment (:func:`start`), started with the session
(conftest.py); each test reads its jobs' results.
"""

import json
import os

import pytest

from emulated_jobs import (CUT_COSTS, FEATURES, PROMPTS, VERIFIED, Jobs, assert_rows_equal, ddtree, feature_job, rows,
                           sampled_job)

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = os.path.join(HERE, os.pardir, os.environ.get("VENV034", ".venv-vllm034"), "bin", "python")

# The sampled-distribution check at a size the interpreted 0.34 engines run in minutes: 200 samples
# at B = 4 (the control is made easy to tell apart by a lower temperature than tests/test_sampling.py's).
SAMPLES = 200


def spec(budget: int, policy: str = "fixed", **options) -> dict:
    return ddtree(budget, policy, custom_method=True, **options)


def jobs() -> dict:
    one = {"target": "context", "prompts": PROMPTS[:1], "engine": {"max_num_seqs": 4}, "params": [{"max_tokens": 4}]}
    return {
        "compatibility": {"check": "compatibility"},
        "plain": feature_job(None), "fixed4": feature_job(spec(4)), "fixed16": feature_job(spec(16)),
        "cut16": feature_job(spec(16, "cost-aware", ddtree_step_costs=CUT_COSTS)),
        "sampled_plain": sampled_job(None, 1.0, 1, SAMPLES), "sampled4": sampled_job(spec(4), 1.0, 2, SAMPLES),
        "sampled_colder4": sampled_job(spec(4), 0.3, 2, SAMPLES),
        "unknown_option": {**one, "spec": spec(16, ddtree_depth=3)},
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
    return {"none": {**one, "spec": None}, "ddtree": {**one, "spec": spec(16)}, "hooks": {"check": "hooks"}}


def in_034(jobs: dict, targets: dict, root, simulate: str = "") -> Jobs:
    """``jobs`` in one process of the 0.34 environment, started now."""
    assert os.path.exists(PYTHON), ("the vLLM 0.34 test environment is missing: run scripts/setup_env_vllm034.sh "
                                    "(make test does)")
    env = {"OMP_NUM_THREADS": "2", "VLLM_USE_V2_MODEL_RUNNER": None}  # 0.34 has no such switch
    return Jobs(jobs, targets, root, env, python=PYTHON, simulate=simulate)


def start(targets: dict, root) -> Jobs:
    """This file's jobs in one process of the 0.34 environment, started now (conftest's ``vllm034``)."""
    return in_034(jobs(), targets, root)


def job(vllm034, name):
    return vllm034.job(name)


def test_every_name_the_adapter_uses_matches_vllm_034(vllm034):
    # The conformance check the plugin runs before it patches anything, on the installed 0.34.0: the
    # custom-method interface, Model Runner V2, request admission, the scheduler's structured outputs
    # and the attention backends.
    result = job(vllm034, "compatibility")
    assert result["vllm"] == "0.34.0"
    assert result["tables"] == ["ATTENTION", "CUSTOM_METHOD", "REQUESTS", "SCHEDULER", "V2_RUNNER"]
    assert result["problems"] == []


@pytest.mark.parametrize("name", ["fixed4", "fixed16", "cut16"])
def test_greedy_and_request_features_equal_the_engine_without_speculation(vllm034, name):
    # Both budget policies at two budgets, on a batch of every request feature (tests/emulated_jobs.py).
    plain, tree = job(vllm034, "plain"), job(vllm034, name)
    assert_rows_equal(rows(tree), rows(plain), VERIFIED)
    greedy = [rows(plain)[f"greedy{i}"]["tokens"] for i in range(4)]
    assert len({tuple(g[:12]) for g in greedy}) == len(PROMPTS)  # every prompt its own answer
    metrics = tree["metrics"]
    drafts, budget = metrics["vllm:spec_decode_num_drafts"], {"fixed4": 4, "fixed16": 16, "cut16": 16}[name]
    if name == "cut16":  # the cost-aware budget keeps a few nodes a request
        assert 0 < metrics["vllm:spec_decode_num_draft_tokens"] < 8 * drafts
    else:
        assert 0.9 * budget * drafts < metrics["vllm:spec_decode_num_draft_tokens"] <= budget * drafts
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0
    assert tree["launched"] == ["kv_commit", "merge_splits", "tree_attention", "tree_build"]


def test_sampled_distribution_matches_no_speculation(vllm034):
    from test_sampling import _homogeneity_p

    def pairs(name):
        return [tuple(sample[1:]) for request in job(vllm034, name)["tokens"] for sample in request]

    plain, tree, colder = pairs("sampled_plain"), pairs("sampled4"), pairs("sampled_colder4")
    assert len(plain) == len(tree) == SAMPLES
    assert job(vllm034, "sampled4")["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, colder) < 1e-3


def test_an_unknown_ddtree_option_is_refused_before_start(vllm034):
    assert ("method \"ddtree\" takes speculator_options ['ddtree_budget', 'ddtree_step_costs']; got ['ddtree_depth']"
            in vllm034.results()["unknown_option"]["error"])


def test_an_incompatible_vllm_034_keeps_serving_other_engines(context_pair, tmp_path):
    # As tests/test_plugin.py on 0.32: with an internal ddtree hooks changed, the plugin warns once,
    # patches nothing, registers "ddtree" as a method refused with its message, and every other
    # engine runs.
    results = in_034(isolation_jobs(), {"context": context_pair}, tmp_path, simulate=RESIGNATURED)
    assert len(results.job("none")["tokens"][0][0]) == 6
    error = results.results()["ddtree"]["error"]
    assert "vllm-ddtree supports vLLM >=0.32,<0.35; on this vLLM (0.34.0) it cannot serve" in error
    assert "GPUModelRunner.prepare_attn takes (self, input_batch, strict), ddtree hooks (self, input_batch)" in error
    assert results.job("hooks")["hooked"] == [False, False, False]


# Every process of the server (front end, engine core) emulates the GPU engine from its start.
SITECUSTOMIZE = """import os, sys
sys.path.insert(0, {tests!r})
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
import emulated_gpu
emulated_gpu.install()
"""


def test_openai_server_serves_ddtree_on_034(vllm034, context_pair, tmp_path):
    # A greedy completion and one with penalties, each equal to the engine without speculation.
    import urllib.request

    from vllm_ddtree.tools.engine_runs import openai_server

    target, drafter = context_pair
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(tests=HERE))
    env = {"PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    args = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4"]

    def post(url, body):
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            return json.loads(answer.read())

    penalties = {k: v for k, v in FEATURES["penalties"][1].items() if k != "logprobs"}
    with openai_server(target, {"model": drafter, **spec(16)}, args, env, startup_timeout=900, python=PYTHON) as server:
        texts = [post(server.url + "/v1/completions", {"model": target, "prompt": PROMPTS[0], **params})
                 ["choices"][0]["text"] for params in (FEATURES["greedy0"][1], penalties)]
        with urllib.request.urlopen(server.url + "/metrics", timeout=60) as answer:
            metrics = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in answer.read().decode().splitlines()
                       if line.startswith("vllm:spec_decode_num") and "per_pos" not in line}
    plain = rows(job(vllm034, "plain"))
    assert texts == [plain["greedy0"]["text"], plain["penalties"]["text"]]
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0
    assert metrics["vllm:spec_decode_num_draft_tokens_total"] == 16 * metrics["vllm:spec_decode_num_drafts_total"]
    assert metrics["vllm:spec_decode_num_accepted_tokens_total"] > 0
