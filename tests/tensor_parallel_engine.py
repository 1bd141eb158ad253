"""One ddtree engine with tensor_parallel_size=2 (run as a script by tests/test_parallel.py: vLLM
starts its workers as processes, so the engine cannot run inside pytest's process).

Usage: ``python tensor_parallel_engine.py TARGET DRAFTER PROMPTS_JSON [CONSTRAINTS_JSON]``; prints
``TOKENS`` and the token ids per prompt as JSON.
"""
import json
import sys

from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from vllm_ddtree.tools.engine_runs import run_engine

if __name__ == "__main__":
    target, drafter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    structured = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None  # per prompt: None or its constraint
    spec = {"method": "ddtree", "model": drafter, "num_speculative_tokens": 16}
    engine = {}
    if structured is None:
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    else:
        params = [SamplingParams(temperature=0, max_tokens=160, structured_outputs=StructuredOutputsParams(**c))
                  if c else SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for c in structured]
        spec["ddtree_budget"] = "fixed"
        engine["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    result = run_engine(target, prompts, params, spec, dtype="float32", gpu_memory_utilization=0.5,
                        max_model_len=512, seed=0, enforce_eager=True, tensor_parallel_size=2, **engine)
    print("TOKENS" + json.dumps(result.tokens))
