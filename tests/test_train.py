"""The DFlash trainer: block layout, loss weights, and a trained drafter that really drafts in vLLM.

The trainer is checked offline on the suite's device (a GPU where there is one). The last test is the
architecture check: a drafter trained here in plain torch, saved in the z-lab format and loaded by
vLLM's own DFlash model, must draft what it learned (deep acceptance), and ddtree's output must still
equal the target's. It also checks the acceptance benchmark's top-1 chain baseline against vLLM's
dflash chain on that drafter.
"""

import os
import re
import sys

import pytest
import torch

from vllm_ddtree.tools.train.dflash import (DrafterConfig, block_batch, evaluate_drafter, extract_features,
                                      extract_features_and_teacher, load_drafter, slot_weights, spread_layer_ids,
                                      train_drafter)


def test_block_layout_and_mask():
    tokens = torch.arange(100, 120)
    block_tokens, positions, labels, mask = block_batch(tokens, 20, [3, 10], block_size=4, mask_token_id=1)
    assert block_tokens.tolist() == [103, 1, 1, 1, 110, 1, 1, 1]
    assert positions.tolist() == [3, 4, 5, 6, 10, 11, 12, 13]
    assert labels.tolist() == [[103, 104, 105, 106], [110, 111, 112, 113]]
    assert mask.shape == (8, 20 + 8)
    assert mask[0, :20].nonzero().flatten().tolist() == [0, 1, 2]  # context strictly before the anchor
    assert mask[5, :20].nonzero().flatten().tolist() == list(range(10))
    assert mask[1, 20:].tolist() == [True] * 4 + [False] * 4  # its own block, both ways
    assert mask[6, 20:].tolist() == [False] * 4 + [True] * 4


def test_slot_weights_and_layer_spread():
    w = slot_weights(5, decay=2.0)
    assert w[0] == 0 and w[1] == 1 and torch.all(w[2:] < w[1:-1])
    assert spread_layer_ids(30, 5) == [1, 8, 14, 21, 28]
    assert spread_layer_ids(4, 2) == [1, 2]


def test_engine_walk_and_tree_acceptance():
    from vllm_ddtree.tools.train.dflash import _tree_accepted_depth, _walk
    from vllm_ddtree.tree import DraftTree

    # Accepted tokens per step at positions 0..5: the engine steps 0 -> 3 -> 4 -> 6 (three steps, six
    # tokens); the mean over all anchors (13 / 6) would overstate the tokens per step.
    assert _walk(torch.tensor([3, 1, 1, 1, 2, 5])) == (6, 3)
    assert _walk(torch.tensor([1, 4])) == (2, 2)  # a step past the end counts the tokens up to it

    # Root 7 (the anchor); nodes 1: 8 (depth 1), 2: 9 (depth 1), 3: 10 under node 2, 4: 11 under node 1,
    # 5: 12 under node 4; unused slot -1.
    tree = DraftTree(token_ids=torch.tensor([[8, 9, 10, 11, 12, -1]]), parents=torch.tensor([[0, 0, 2, 1, 4, 0]]),
                     depths=torch.tensor([[1, 1, 2, 2, 3, 1]]), scores=torch.zeros(1, 6), num_nodes=torch.tensor([5]),
                     ancestor_bits=torch.zeros(1, 7, 1, dtype=torch.int32), max_depth=3)
    assert _tree_accepted_depth(tree, torch.tensor([[7, 8, 11, 12]])).tolist() == [3]
    assert _tree_accepted_depth(tree, torch.tensor([[7, 9, 10, 5]])).tolist() == [2]
    assert _tree_accepted_depth(tree, torch.tensor([[7, 8, 10, 12]])).tolist() == [1]  # 10 is not under 8
    assert _tree_accepted_depth(tree, torch.tensor([[7, 5, 11, 12]])).tolist() == [0]


def test_smollm2_training_prompts_are_stable_and_not_the_evaluation_prompts():
    import re
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from bench_acceptance import humaneval_prompts, mtbench_prompts

    from vllm_ddtree.tools.train.smollm2 import EVALUATION_NAME_OVERLAP, training_prompts

    prompts = training_prompts()
    assert prompts == training_prompts() and len(prompts) > 1500  # the data cache keys on them
    assert not any(re.search(r" at 0x[0-9a-f]+", p) for p in prompts)
    evaluation = humaneval_prompts() + mtbench_prompts()
    assert len(evaluation) == 164 + 80
    assert not set(prompts) & set(evaluation)
    assert not any(e[len("Complete this Python function:"):].strip()[:60] in p for e in evaluation[:164] for p in prompts)
    # Shared function names (different functions) are recorded in every recipe.json.
    def names(texts):
        return {n for t in texts for n in re.findall(r"def (\w+)\(", t)}
    assert names(prompts) & names(evaluation[:164]) == set(EVALUATION_NAME_OVERLAP)


def test_smollm2_trainer_refuses_data_without_greedy_answers(tmp_path, capsys):
    from vllm_ddtree.tools.train.smollm2 import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "d"), "--temperatures", "0.7", "1"])
    assert "--temperatures must include 0: the held-out scores read the greedy answers" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


def _train_tiny_drafter(target_dir: str, device: str, steps: int = 75, distill: float = 0.0):
    """The tiny target on ``device``, its own greedy text, and drafters trained on it for 0 and ``steps`` steps."""
    from tiny_models import BLOCK_SIZE, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, TARGET_LAYER_IDS, TARGET_LAYERS, VOCAB
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    sequences = []
    with torch.no_grad():  # the target's own greedy text
        for _ in range(12):
            prompt = torch.randint(2, 300, (int(torch.randint(3, 10, (1,), generator=gen)),), generator=gen)
            out = target.generate(prompt.unsqueeze(0), max_new_tokens=48, min_new_tokens=48, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            sequences.append((out[0], len(prompt)))
    config = DrafterConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                           head_dim=HEAD_DIM, intermediate_size=256, vocab_size=VOCAB,
                           target_layer_ids=TARGET_LAYER_IDS, num_target_layers=TARGET_LAYERS,
                           block_size=BLOCK_SIZE, mask_token_id=1)
    target.to(device)
    features = extract_features(target, sequences, TARGET_LAYER_IDS)
    untrained = train_drafter(target, sequences, config, steps=0, features=features)
    drafter = train_drafter(target, sequences, config, steps=steps, sequences_per_step=2, features=features,
                            distill=distill)
    return target, sequences, features, untrained, drafter


def test_trainer_learns_on_the_targets_device(tmp_path, device):
    # The trainer follows the target: features, drafter and blocks on its device (a GPU in scripts/gpu_checks.sh).
    from tiny_models import BLOCK_SIZE, write_target

    target, sequences, features, untrained, drafter = _train_tiny_drafter(write_target(str(tmp_path / "t")), device)
    assert features[0].device.type == device and next(drafter.parameters()).device.type == device
    # The offline estimate of a chain's acceptance: near 1 before training, deep after.
    assert evaluate_drafter(untrained, target, sequences, features)["chain_tau"] < 1.5
    quality = evaluate_drafter(drafter, target, sequences, features)
    assert quality["chain_tau"] >= 4.0 and len(quality["slot_accuracy"]) == BLOCK_SIZE - 1
    drafter.save(str(tmp_path / "saved"))  # from any device to a CPU checkpoint
    assert os.path.isfile(tmp_path / "saved" / "model.safetensors")


def test_drafter_checkpoint_loads_back_and_training_resumes(tmp_path, capsys):
    from tiny_models import write_target

    target, sequences, features, _, drafter = _train_tiny_drafter(write_target(str(tmp_path / "t")), "cpu", steps=6)
    drafter.save(str(tmp_path / "saved"))
    loaded = load_drafter(str(tmp_path / "saved"))
    assert loaded.c == drafter.c
    for name, weight in drafter.checkpoint_state().items():
        assert torch.equal(loaded.checkpoint_state()[name], weight), name

    # A run stopped after a saved state and started again ends where one uninterrupted run ends.
    features, teacher = extract_features_and_teacher(target, sequences, drafter.c.target_layer_ids, teacher_top=8)
    kwargs = dict(steps=6, sequences_per_step=2, features=features, distill=0.5, teacher=teacher)
    whole = train_drafter(target, sequences, drafter.c, **kwargs)
    state, saved = str(tmp_path / "state.pt"), []

    def stop_at_4(step, _):
        saved.append(step)
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_drafter(target, sequences, drafter.c, state_path=state, save_every=2, on_save=stop_at_4, **kwargs)
    capsys.readouterr()
    resumed = train_drafter(target, sequences, drafter.c, state_path=state, save_every=2, progress=True,
                            on_save=lambda step, _: saved.append(step) or {"held-out chain tau": f"{step}.5"}, **kwargs)
    assert saved == [2, 4, 6]
    # The progress bar: from the resumed step to the last, with the loss and what on_save returned.
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("training: 100%") and "6/6" in bar and "held-out chain tau=6.5" in bar, bar
    assert re.search(r"loss=\d+\.\d{3}", bar), bar
    for name, weight in whole.checkpoint_state().items():
        assert torch.equal(resumed.checkpoint_state()[name], weight), name
    with pytest.raises(ValueError, match="state of another run"):
        train_drafter(target, sequences, drafter.c, state_path=state, **{**kwargs, "steps": 7})


def _kl_to_target(drafter, target, sequences, features):
    """Mean KL(target || drafter) over every slot of blocks at every response position: calibration."""
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    S, total = drafter.c.block_size, []
    with torch.no_grad():
        for (tokens, prompt_len), feats in zip(sequences, features):
            final = target(tokens.unsqueeze(0), output_hidden_states=True).hidden_states[-1][0]
            anchors = torch.arange(max(prompt_len - 1, 1), len(tokens) - S + 1)
            block_tokens, positions, _, mask = block_batch(tokens, len(tokens), anchors, S, drafter.c.mask_token_id)
            logp = head(drafter(embed(block_tokens), positions, feats, torch.arange(len(tokens)), mask)).log_softmax(-1)
            target_logp = head(final[positions - 1]).log_softmax(-1)
            kl = (target_logp.exp() * (target_logp - logp)).sum(-1).view(-1, S)[:, 1:]
            total.append(kl.flatten())
    return torch.cat(total).mean().item()


def test_distilled_drafter_follows_the_targets_distribution(tmp_path):
    # Issue 16's first lever: the cross-entropy to the target's softmax (distill = 1) against the one to
    # its greedy token, same data, steps and seed. Both draft the greedy text; the distilled drafter's
    # distributions are closer to the target's, which is what a tree's node selection reads.
    from tiny_models import write_target

    target_dir = write_target(str(tmp_path / "t"), head_scale=0.5)  # a target with real uncertainty
    target, sequences, features, _, hard = _train_tiny_drafter(target_dir, "cpu", steps=60)
    *_, soft = _train_tiny_drafter(target_dir, "cpu", steps=60, distill=1.0)
    assert evaluate_drafter(soft, target, sequences, features)["chain_tau"] >= 2.0
    assert _kl_to_target(soft, target, sequences, features) < 0.8 * _kl_to_target(hard, target, sequences, features)
    with pytest.raises(ValueError, match=r"distill must be in \[0, 1\]"):
        train_drafter(target, sequences, soft.c, steps=1, features=features, distill=1.5)


def test_trained_drafter_drafts_in_vllm(tmp_path):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tiny_models import BLOCK_SIZE, write_target
    from vllm import SamplingParams

    from vllm_ddtree.tools.engine_runs import run_engine

    target_dir = write_target(str(tmp_path / "target"))
    drafter_dir = str(tmp_path / "trained")
    _train_tiny_drafter(target_dir, "cpu")[-1].save(drafter_dir)

    prompts = ["alpha beta", "the tree of draft", "gamma delta token verify commit", "a"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    def run(spec):
        result = run_engine(target_dir, prompts, params, spec, dtype="float32", gpu_memory_utilization=0.5,
                            max_model_len=512, seed=0, enforce_eager=True, disable_log_stats=False)
        return [t[0] for t in result.tokens], result.metrics

    reference, _ = run(None)
    tokens, metrics = run({"method": "ddtree", "model": drafter_dir, "num_speculative_tokens": 16,
                           "ddtree_budget": "fixed"})
    assert tokens == reference
    tau = 1 + metrics["vllm:spec_decode_num_accepted_tokens"] / metrics["vllm:spec_decode_num_drafts"]
    assert tau >= 4.0, tau  # D = 7: a drafter that learned nothing gets ~1

    # The acceptance benchmark's sampled chain baseline, the drafter's argmax chain as a ddtree tree,
    # must take exactly vLLM's dflash steps at T = 0: same outputs, drafts and accepted tokens.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from bench_acceptance import top1_chain_trees

    chain_spec = {"model": drafter_dir, "num_speculative_tokens": BLOCK_SIZE - 1}
    chain, chain_metrics = run({"method": "dflash", **chain_spec})
    with top1_chain_trees():
        top1, top1_metrics = run({"method": "ddtree", "ddtree_budget": "fixed", **chain_spec})
    assert top1 == chain == reference
    for name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens"):
        assert top1_metrics[name] == chain_metrics[name] > 0, name
