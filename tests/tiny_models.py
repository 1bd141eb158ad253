"""A tiny random Qwen3 target and a tiny random DFlash drafter (z-lab format), written as real checkpoints.

vLLM loads them like any model: safetensors weights, a config.json and a byte-level BPE tokenizer
trained here on a synthetic corpus. Random weights are enough for the end-to-end tests: they compare
outputs with and without speculation, not quality.
"""

from __future__ import annotations

import json
import os

import torch

VOCAB = 512
HIDDEN = 128
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32
TARGET_LAYERS = 4
BLOCK_SIZE = 8  # drafter block: D = 7 draft positions
TARGET_LAYER_IDS = [0, 2]
MOE_INTERMEDIATE = 64
LIKELY = 12  # tokens 2..LIKELY-1 carry the target's mass (0 is eos, 1 the drafter's mask)


def _corpus():
    words = ["alpha", "beta", "gamma", "delta", "tree", "draft", "token", "verify", "commit", "the", "a", "of"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(words), (12,), generator=gen).tolist()
        yield " ".join(words[i] for i in idx) + "."


def write_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<|endoftext|>", "<|mask|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "model_max_length": 4096,
                   "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"}, f)


def _qwen3_config(num_layers: int, **extra) -> dict:
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": 256, "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "silu", "attention_bias": False,
    }
    config.update(extra)
    return config


def _layer_weights(prefix: str, gen) -> dict[str, torch.Tensor]:
    def w(*shape, scale=0.08):
        return torch.randn(*shape, generator=gen) * scale

    def writes_residual(*shape):  # output projections leave hidden dimension 0 alone
        x = w(*shape)
        x[0] = 0.0
        return x
    return {
        f"{prefix}self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
        f"{prefix}self_attn.o_proj.weight": writes_residual(HIDDEN, HEADS * HEAD_DIM),
        f"{prefix}self_attn.q_norm.weight": torch.ones(HEAD_DIM),
        f"{prefix}self_attn.k_norm.weight": torch.ones(HEAD_DIM),
        f"{prefix}mlp.gate_proj.weight": w(256, HIDDEN),
        f"{prefix}mlp.up_proj.weight": w(256, HIDDEN),
        f"{prefix}mlp.down_proj.weight": writes_residual(HIDDEN, 256),
        f"{prefix}input_layernorm.weight": torch.ones(HIDDEN),
        f"{prefix}post_attention_layernorm.weight": torch.ones(HIDDEN),
    }


def _moe_layer_weights(prefix: str, gen, experts: int) -> dict[str, torch.Tensor]:
    """Qwen3-MoE's MLP in place of the dense one: a router and ``experts`` small experts."""
    dense = _layer_weights(prefix, gen)
    weights = {k: v for k, v in dense.items() if ".mlp." not in k}
    weights[f"{prefix}mlp.gate.weight"] = torch.randn(experts, HIDDEN, generator=gen) * 0.5
    for e in range(experts):
        for name, shape in (("gate_proj", (MOE_INTERMEDIATE, HIDDEN)), ("up_proj", (MOE_INTERMEDIATE, HIDDEN)),
                            ("down_proj", (HIDDEN, MOE_INTERMEDIATE))):
            w = torch.randn(*shape, generator=gen) * 0.08
            if name == "down_proj":
                w[0] = 0.0  # the constant channel stays untouched, as in the dense layers
            weights[f"{prefix}mlp.experts.{e}.{name}.weight"] = w
    return weights


def write_target(folder: str, seed: int = 0, head_scale: float = 1.5, experts: int = 0,
                 attention_scale: float = 1.0, layers: int = TARGET_LAYERS) -> str:
    """``head_scale`` sets how peaked the target is: 1.5 is near-deterministic, 0.15 samples widely.
    ``experts`` > 0 writes a Qwen3-MoE target (that many experts, two per token) instead.
    ``attention_scale`` scales every layer's attention projections: at 1 the next token depends
    mostly on the current one (greedy answers settle on a repeated token), at 4 on the context too
    (every prompt gets its own answer, and wrong tree positions, masks or KV change it). ``layers``:
    fewer for engines whose attention runs interpreted (its drafter must name layers it has)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    # The LM head favours a few "likely" tokens: the target's greedy choices stay among them, and a
    # random drafter sharing this head proposes them too, so trees get accepted often and along varied
    # paths (a uniform random target would accept almost nothing). Large logits also avoid near-ties.
    # Hidden dimension 0 is a constant channel (no layer writes it), so head column 0 acts as a bias.
    embed = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    embed[:, 0] = 5.0
    lm_head = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.01
    lm_head[2:LIKELY] = torch.randn(LIKELY - 2, HIDDEN, generator=gen) * head_scale
    lm_head[:, 0] = -3.0
    lm_head[2:LIKELY, 0] = 3.0
    weights = {"model.embed_tokens.weight": embed,
               "model.norm.weight": torch.ones(HIDDEN),
               "lm_head.weight": lm_head}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        weights.update(_moe_layer_weights(prefix, gen, experts) if experts else _layer_weights(prefix, gen))
        for norm in ("q_norm", "k_norm"):  # Qwen3 normalises q and k per head: their norms set the sharpness
            weights[f"{prefix}self_attn.{norm}.weight"] *= attention_scale
    save_file(weights, os.path.join(folder, "model.safetensors"))
    config = _qwen3_config(layers)
    if experts:
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=experts,
                      num_experts_per_tok=2, moe_intermediate_size=MOE_INTERMEDIATE, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    write_tokenizer(folder)
    return folder


def write_dflash_drafter(folder: str, seed: int = 1, layers: int = 1, block_size: int = BLOCK_SIZE,
                         target_layer_ids=tuple(TARGET_LAYER_IDS), mask_token_id: int = 1,
                         target_layers: int = TARGET_LAYERS) -> str:
    """z-lab format: DFlashDraftModel, block_size, dflash_config; no embedding or LM head (shared)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    # A damped final norm (but for the constant channel 0) keeps the drafter's distribution broad over
    # the target's likely tokens, as a real drafter's is over plausible continuations.
    norm = torch.full((HIDDEN,), 0.03)
    norm[0] = 1.0
    weights = {"fc.weight": torch.randn(HIDDEN, HIDDEN * len(target_layer_ids), generator=gen) * 0.05,
               "hidden_norm.weight": torch.ones(HIDDEN), "norm.weight": norm}
    for i in range(layers):
        weights.update(_layer_weights(f"layers.{i}.", gen))
    save_file(weights, os.path.join(folder, "model.safetensors"))
    config = _qwen3_config(layers, architectures=["DFlashDraftModel"], block_size=block_size,
                           num_target_layers=target_layers,
                           dflash_config={"mask_token_id": mask_token_id, "target_layer_ids": list(target_layer_ids)})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def write_speculators_dflash_drafter(folder: str, z_lab_folder: str) -> str:
    """The same drafter in the ``speculators`` format: its config nests the layer config and numbers
    the target layers one higher (``aux_hidden_state_layer_ids``); the weights are unchanged."""
    import shutil

    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(z_lab_folder, "model.safetensors"), folder)
    with open(os.path.join(z_lab_folder, "config.json")) as f:
        layer_config = json.load(f)
    dflash = layer_config.pop("dflash_config")
    block_size = layer_config.pop("block_size")
    layer_config["architectures"] = ["Qwen3ForCausalLM"]
    config = {
        "speculators_model_type": "dflash", "transformer_layer_config": layer_config,
        "aux_hidden_state_layer_ids": [i + 1 for i in dflash["target_layer_ids"]],
        "mask_token_id": dflash["mask_token_id"], "target_hidden_size": HIDDEN,
        "speculators_config": {"proposal_methods": [{"proposal_type": "dflash", "speculative_tokens": block_size - 1}],
                               "verifier": {"name_or_path": "target"}},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder
