"""A DFlash drafter in plain torch, trained as published, saved in the z-lab checkpoint format.

Architecture (what vLLM's ``DFlashQwen3ForCausalLM`` computes, so a checkpoint trained here drafts the
same in vLLM): the concatenated target hidden states of ``target_layer_ids`` (the outputs of those
layers: Hugging Face ``hidden_states[i + 1]``) go through ``fc`` and ``hidden_norm``; every drafter layer
projects them to context keys (``k_proj``, ``k_norm``, RoPE at the context positions) and values
(``v_proj``). The block ``[anchor token, MASK x (S-1)]`` at positions anchor..anchor+S-1 runs through
Qwen3 decoder layers whose attention sees the context before the anchor and the whole block
(non-causal); the final ``norm`` and the target's frozen LM head give slot k's logits for the token at
anchor + k. The target's embedding and LM head are shared and frozen.

Training: random anchors in the target's own responses (from the first answer token, the first
anchor inference ever drafts from), slot k's label is the token at anchor + k (what verification
will check), weight ``exp(-(k-1)/decay)`` on later slots. With ``distill`` > 0 the loss mixes in the
cross-entropy to the target's own distribution for that token (its softmax at position
anchor + k - 1, kept as its top tokens, renormalised): trees pick nodes by the drafter's
probabilities, so their calibration matters as much as the top-1 token. Runs resume from a state
file (weights, optimiser, schedule and anchor generator), so a long run can span sessions.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm
from torch import nn


# The teacher's distribution is kept as its most likely tokens: the drafter's loss reads the target's
# probability mass where it matters, without a vocabulary-wide row per training position in memory.
TEACHER_TOP = 64


@dataclass
class DrafterConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    target_layer_ids: list[int]
    num_target_layers: int
    num_hidden_layers: int = 1
    block_size: int = 16
    mask_token_id: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    extra: dict = field(default_factory=dict)

    def checkpoint_config(self) -> dict:
        """config.json of the z-lab format (Qwen3 fields + block_size + dflash_config)."""
        return {
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
            "hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
            "num_hidden_layers": self.num_hidden_layers, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
            "block_size": self.block_size, "num_target_layers": self.num_target_layers,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": list(self.target_layer_ids)},
            **self.extra,
        }


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding on ``x [N, heads, head_dim]`` at ``positions [N]``."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float().unsqueeze(1) * freqs
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class DrafterLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, kv, bias=False)
        self.o_proj = nn.Linear(q, c.hidden_size, bias=False)
        self.q_norm = nn.Parameter(torch.ones(c.head_dim))
        self.k_norm = nn.Parameter(torch.ones(c.head_dim))
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(c.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(c.hidden_size))

    def keys_values(self, states, positions):
        c = self.c
        k = self.k_proj(states).view(-1, c.num_key_value_heads, c.head_dim)
        k = rope(rms_norm(k, self.k_norm, c.rms_norm_eps), positions, c.rope_theta)
        return k, self.v_proj(states).view(-1, c.num_key_value_heads, c.head_dim)

    def forward(self, hidden, positions, context, context_positions, mask):
        c = self.c
        x = rms_norm(hidden, self.input_layernorm, c.rms_norm_eps)
        q = self.q_proj(x).view(-1, c.num_attention_heads, c.head_dim)
        q = rope(rms_norm(q, self.q_norm, c.rms_norm_eps), positions, c.rope_theta)
        k_block, v_block = self.keys_values(x, positions)
        k_ctx, v_ctx = self.keys_values(context, context_positions)
        k = torch.cat([k_ctx, k_block]).repeat_interleave(c.num_attention_heads // c.num_key_value_heads, 1)
        v = torch.cat([v_ctx, v_block]).repeat_interleave(c.num_attention_heads // c.num_key_value_heads, 1)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask)
        hidden = hidden + self.o_proj(attn.transpose(0, 1).reshape(hidden.shape[0], -1))
        x = rms_norm(hidden, self.post_attention_layernorm, c.rms_norm_eps)
        return hidden + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDrafter(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.layers = nn.ModuleList(DrafterLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))

    def forward(self, block_embeds, positions, target_hidden, context_positions, mask):
        """``block_embeds [Q, H]`` at ``positions [Q]``; ``target_hidden [C, A*H]`` at
        ``context_positions [C]``; ``mask [Q, C+Q]`` (True = visible) -> final hidden ``[Q, H]``."""
        context = rms_norm(self.fc(target_hidden), self.hidden_norm, self.c.rms_norm_eps)
        hidden = block_embeds
        for layer in self.layers:
            hidden = layer(hidden, positions, context, context_positions, mask)
        return rms_norm(hidden, self.norm, self.c.rms_norm_eps)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Weights under the z-lab names (no ``model.`` prefix; embedding and LM head are the target's)."""
        return {k: v.detach().contiguous().clone() for k, v in _checkpoint_parameters(self).items()}

    def save(self, folder: str, dtype=torch.float32) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.to("cpu", dtype) for k, v in self.checkpoint_state().items()},
                  os.path.join(folder, "model.safetensors"))
        config = self.c.checkpoint_config()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=1)


def load_drafter(folder: str) -> DFlashDrafter:
    """A checkpoint saved by :meth:`DFlashDrafter.save` (the z-lab format), in float32 on the CPU."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    dflash = raw["dflash_config"]
    fields = {k: raw[k] for k in DrafterConfig.__dataclass_fields__ if k in raw and k != "extra"}
    drafter = DFlashDrafter(DrafterConfig(**fields, target_layer_ids=dflash["target_layer_ids"],
                                          mask_token_id=dflash["mask_token_id"]))
    weights = load_file(os.path.join(folder, "model.safetensors"))
    parameters = _checkpoint_parameters(drafter)
    if set(weights) != set(parameters):
        raise ValueError(f"{folder}: weights {sorted(set(weights) ^ set(parameters))} do not match its config.json")
    with torch.no_grad():
        for name, tensor in parameters.items():
            tensor.copy_(weights[name].float())
    return drafter


def _checkpoint_parameters(drafter: DFlashDrafter) -> dict[str, torch.Tensor]:
    out = {"fc.weight": drafter.fc.weight, "hidden_norm.weight": drafter.hidden_norm, "norm.weight": drafter.norm}
    for i, layer in enumerate(drafter.layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}self_attn.{name}.weight"] = getattr(layer, name).weight
        out[f"{p}self_attn.q_norm.weight"] = layer.q_norm
        out[f"{p}self_attn.k_norm.weight"] = layer.k_norm
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}mlp.{name}.weight"] = getattr(layer, name).weight
        out[f"{p}input_layernorm.weight"] = layer.input_layernorm
        out[f"{p}post_attention_layernorm.weight"] = layer.post_attention_layernorm
    return out


def spread_layer_ids(num_target_layers: int, count: int) -> list[int]:
    """``count`` target layers spread over the depth, from the second to the second-to-last."""
    if count == 1:
        return [num_target_layers // 2]
    lo, hi = 1, num_target_layers - 2
    return [round(lo + (hi - lo) * i / (count - 1)) for i in range(count)]


def block_batch(tokens, num_context, anchors, block_size, mask_token_id):
    """Queries, positions, labels and the visibility mask for DFlash blocks at ``anchors`` of one sequence.

    Block j is ``[tokens[a_j], MASK...]`` at positions a_j..a_j+S-1; it sees context positions < a_j
    (of the ``num_context`` available) and its own block, both ways.
    """
    S = block_size
    anchors = torch.as_tensor(anchors)
    slot = torch.arange(S)
    positions = (anchors.unsqueeze(1) + slot).flatten()
    block_tokens = torch.full((len(anchors), S), mask_token_id, dtype=torch.long)
    block_tokens[:, 0] = tokens[anchors]
    labels = tokens[(anchors.unsqueeze(1) + slot).clamp(max=len(tokens) - 1)]
    Q = len(anchors) * S
    sees_context = torch.arange(num_context).unsqueeze(0) < anchors.repeat_interleave(S).unsqueeze(1)
    block_of = torch.arange(Q) // S
    sees_block = block_of.unsqueeze(1) == block_of.unsqueeze(0)
    return block_tokens.flatten(), positions, labels, torch.cat([sees_context, sees_block], 1)


def slot_weights(block_size: int, decay: float) -> torch.Tensor:
    """Loss weight of slot k (k = 1..S-1; slot 0 holds the anchor and has no loss)."""
    k = torch.arange(block_size, dtype=torch.float32)
    return torch.where(k == 0, 0.0, torch.exp(-(k - 1) / decay))


def extract_features(target, sequences, layer_ids) -> list[torch.Tensor]:
    """The drafter's context features of each sequence: ``[T, len(layer_ids) * H]`` in the target's dtype,
    on the target's device."""
    return extract_features_and_teacher(target, sequences, layer_ids, teacher_top=0)[0]


def extract_features_and_teacher(target, sequences, layer_ids, teacher_top: int = TEACHER_TOP,
                                 progress: bool = False):
    """One target pass per sequence giving both the drafter's context features (as
    :func:`extract_features`) and the teacher of :func:`train_drafter`'s ``distill``: per position p the
    target's distribution for the token at p + 1 (its final hidden state through its LM head, at T = 1),
    kept as its ``teacher_top`` most likely tokens, ``(probabilities [T, k] float32 renormalised to sum 1,
    token ids [T, k])``. ``teacher_top`` = 0 skips the teacher (returns ``None`` for it). ``progress``
    shows a bar of sequences done."""
    target.eval().requires_grad_(False)
    device = target.get_input_embeddings().weight.device
    head = target.get_output_embeddings()
    feats, teacher = [], [] if teacher_top else None
    with torch.no_grad():
        for tokens, _ in tqdm(sequences, desc="target features", unit="answer", disable=not progress,
                              dynamic_ncols=True):
            hs = target(tokens.to(device).unsqueeze(0), output_hidden_states=True).hidden_states
            feats.append(torch.cat([hs[i + 1][0] for i in layer_ids], -1))
            if teacher_top:  # hidden_states[-1] is after the final norm: what the LM head reads
                probs, ids = head(hs[-1][0]).float().softmax(-1).topk(teacher_top, -1)
                teacher.append((probs / probs.sum(-1, keepdim=True), ids.int()))
    return feats, teacher


def _on(device, *tensors):
    # Blocks are laid out on the host (small index work), then moved once per sequence.
    return [t.to(device, non_blocking=True) for t in tensors]


def _autocast(features: list[torch.Tensor]):
    # bf16 features come from a bf16 target: train in bf16 too (AMX on CPU, tensor cores on GPU).
    enabled = bool(features) and features[0].dtype == torch.bfloat16
    return torch.autocast(features[0].device.type if features else "cpu", dtype=torch.bfloat16, enabled=enabled)


def _anchor_range(tokens: torch.Tensor, prompt_len: int, block_size: int) -> tuple[int, int]:
    # Inference drafts from the first answer token on (the target's first token is the first anchor);
    # the prompt's last token is never an anchor. Full blocks only.
    return max(prompt_len, 1), len(tokens) - block_size


def train_drafter(target, sequences, config: DrafterConfig, steps: int, anchors_per_step: int = 16,
                  lr: float = 2e-3, decay: float = 4.0, seed: int = 0, log_every: int = 0,
                  sequences_per_step: int = 1, features: list[torch.Tensor] | None = None,
                  distill: float = 0.0, teacher: list | None = None, state_path: str | None = None,
                  save_every: int = 0, on_save=None, progress: bool = False) -> DFlashDrafter:
    """Trains a drafter for a Hugging Face causal LM ``target`` on ``sequences`` (token id tensors of
    the target's own text, each with its prompt length): list of ``(tokens [T], prompt_len)``.
    Each step takes ``anchors_per_step`` random anchors in each of ``sequences_per_step`` sequences.
    ``distill`` in [0, 1] weighs the cross-entropy to the target's distribution against the one to the
    text's token (``teacher``: from :func:`extract_features_and_teacher`, computed if not given).
    With ``state_path``, the run saves its state there every ``save_every`` steps and at the end, and
    a run started with an existing state file continues from it (same data and arguments); ``on_save``
    is called with ``(step, drafter)`` after each save (to evaluate the checkpoints); a dictionary it
    returns is shown beside the loss on the progress bar (``progress``: steps, loss, time left).
    The drafter trains on the target's device (a GPU when the target is on one)."""
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {distill}")
    torch.manual_seed(seed)
    target.eval().requires_grad_(False)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    if features is None or (distill and teacher is None):
        features, teacher = extract_features_and_teacher(target, sequences, config.target_layer_ids,
                                                         TEACHER_TOP if distill else 0)
    device = embed.weight.device
    drafter = DFlashDrafter(config)
    for name, p in drafter.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)  # on the CPU generator: the same start on every device
    drafter.to(device)
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    weights = slot_weights(config.block_size, decay).to(device)
    gen = torch.Generator().manual_seed(seed)
    first_step = 0
    if state_path and os.path.isfile(state_path):
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["steps"] != steps or state["config"] != asdict(config):
            raise ValueError(f"{state_path} is the state of another run ({state['steps']} steps, "
                             f"{state['config']}); remove it or pass that run's arguments")
        drafter.load_state_dict(state["drafter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        first_step = state["step"]

    def save(step):
        if state_path:
            torch.save({"step": step, "steps": steps, "config": asdict(config), "drafter": drafter.state_dict(),
                        "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                        "generator": gen.get_state()}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)  # a run killed mid-save keeps the last state
        if on_save:
            return on_save(step, drafter)

    S = config.block_size
    usable = [i for i, (t, p) in enumerate(sequences) if (span := _anchor_range(t, p, S))[1] >= span[0]]
    bar = tqdm(total=steps, initial=first_step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    shown = {}
    for step in range(first_step, steps):
        loss = 0.0
        for _ in range(sequences_per_step):
            i = usable[int(torch.randint(len(usable), (1,), generator=gen))]
            tokens, prompt_len = sequences[i]
            lo, hi = _anchor_range(tokens, prompt_len, S)
            anchors = torch.randint(lo, hi + 1, (anchors_per_step,), generator=gen)
            block_tokens, positions, labels, mask = _on(device, *block_batch(tokens, len(tokens), anchors, S,
                                                                             config.mask_token_id))
            with _autocast(features):
                hidden = drafter(embed(block_tokens), positions, features[i],
                                 torch.arange(len(tokens), device=device), mask)
                logits = head(hidden)
            logp = logits.float().log_softmax(-1)
            loss_per = -logp.gather(-1, labels.view(-1, 1)).view(-1, S)
            if distill:  # the target's distribution for each slot's token: its row at the slot's position - 1
                probs, ids = (t[(positions - 1).clamp(min=0)] for t in teacher[i])
                soft_loss = -(probs * logp.gather(-1, ids.long())).sum(-1).view(-1, S)
                loss_per = (1 - distill) * loss_per + distill * soft_loss
            loss = loss + (loss_per * weights).sum() / (weights.sum() * len(anchors) * sequences_per_step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            (bar.write if progress else print)(f"step {step} loss {loss.item():.3f}")
        if progress and (step % 10 == 0 or step == steps - 1):  # read back every 10th step: a sync on a GPU
            shown["loss"] = f"{loss.item():.3f}"
            bar.set_postfix(shown, refresh=False)
        bar.update()
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            shown.update(save(step + 1) or {})
    if first_step < steps or not state_path:
        shown.update(save(steps) or {})
        bar.set_postfix(shown)
    bar.close()
    return drafter


@torch.no_grad()
def evaluate_drafter(drafter: DFlashDrafter, target, sequences, features, max_anchors: int | None = 64,
                     tree_budget: int = 0) -> dict:
    """What a chain (and a tree of ``tree_budget`` nodes) would accept on ``sequences`` of the target's
    greedy text: the drafter's guesses against that text.

    Returns ``slot_accuracy`` (slot 1..S-1, each on its own), ``chain_tau`` (tokens per target step of
    a greedy chain of S-1 drafts) and, with a budget, ``tree_tau`` (the same for the tree the engine
    builds from these distributions with :func:`vllm_ddtree.tree.build_tree`: 1 + the depth of its
    deepest node whose path is the text).

    With ``max_anchors`` (evenly spaced per response) tau is the mean over those anchors of what a
    step accepts: cheap, but not what the engine measures. Its steps start where the previous one
    ended, so it steps more often through text the drafter gets wrong, and its tau (tokens / steps) is
    below that mean wherever acceptance varies along the text. ``max_anchors=None`` scores every
    position and walks each response as the engine does (greedy verification is deterministic): the
    engine's own tau.
    """
    from vllm_ddtree.tree import build_tree

    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    device = embed.weight.device
    S = drafter.c.block_size
    correct, accepted = [], {"chain": [], "tree": []}  # tokens a step accepts per anchor, per response
    for (tokens, prompt_len), feats in zip(sequences, features):
        lo, hi = _anchor_range(tokens, prompt_len, S)
        if hi < lo:
            continue
        count = hi - lo + 1 if max_anchors is None else min(max_anchors, hi - lo + 1)
        anchors = torch.linspace(lo, hi, count).round().long().unique()
        seq_chain, seq_tree = [], []
        for chunk in anchors.split(64):  # bounds the vocabulary-wide logits in memory
            block_tokens, positions, labels, mask = _on(device, *block_batch(tokens, len(tokens), chunk, S,
                                                                             drafter.c.mask_token_id))
            with _autocast(features):
                logits = head(drafter(embed(block_tokens), positions, feats,
                                      torch.arange(len(tokens), device=device), mask)).float().view(len(chunk), S, -1)
            hits = (logits.argmax(-1) == labels)[:, 1:]
            correct.append(hits)
            seq_chain.append(1 + hits.int().cumprod(1).sum(1))
            if tree_budget:
                seq_tree.append(1 + _tree_accepted_depth(build_tree(logits[:, 1:], tree_budget), labels).long())
        accepted["chain"].append(torch.cat(seq_chain).cpu())
        if tree_budget:
            accepted["tree"].append(torch.cat(seq_tree).cpu())
    quality = {"slot_accuracy": torch.cat(correct).float().mean(0).tolist()}
    for name, responses in accepted.items():
        if not responses:
            continue
        if max_anchors is None:
            tokens_, steps = (sum(column) for column in zip(*map(_walk, responses)))
            quality[f"{name}_tau"] = tokens_ / steps
        else:
            quality[f"{name}_tau"] = torch.cat(responses).float().mean().item()
    return quality


def _walk(accepted: torch.Tensor) -> tuple[int, int]:
    """Tokens and steps of the engine through one response: from the first anchor, each step commits
    what it accepts there (``accepted[i]``: at the i-th position from the first anchor)."""
    position, steps = 0, 0
    accepted = accepted.tolist()
    while position < len(accepted):
        position += accepted[position]
        steps += 1
    return min(position, len(accepted)), steps


def _tree_accepted_depth(tree, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the depth of the deepest node whose path equals ``labels[:, 1:]`` (greedy verification):
    the verifier's own walk, with the text's next token as the target's token at every node."""
    from vllm_ddtree.verify import walk_tree

    depths = torch.cat([torch.zeros_like(tree.depths[:, :1]), tree.depths], 1)  # the root: the anchor, depth 0
    return walk_tree(tree, labels.gather(1, (depths + 1).clamp(max=labels.shape[1] - 1)))[1]


__all__ = ["DFlashDrafter", "DrafterConfig", "asdict", "block_batch", "evaluate_drafter", "extract_features",
           "extract_features_and_teacher", "load_drafter", "slot_weights", "spread_layer_ids", "train_drafter"]
