"""A tool, not a step of the round: a toy target with known conditionals, generation loops over it
(through :func:`vllm_ddtree.tree_round.tree_round`), and the toy demo.

Used by the losslessness tests and the round benchmark, and runnable as ``python -m vllm_ddtree.tools.toy``:
the same drafter as a chain and as a tree, on a batch, with tau for both. The target is a second-order Markov model over a small vocabulary: the logits of the next token are
``table[previous-but-one token, previous token]``. Its conditional at every tree node follows from the
node's path, so a whole tree's target logits are two gathers, and the exact distribution of the first
L generated tokens can be enumerated (the tests do).
"""

from __future__ import annotations

import torch

from vllm_ddtree.tree_round import tree_round
from vllm_ddtree.verify import TreeSampling, sample_target_tokens


class MarkovTarget:
    def __init__(self, vocab: int, seed: int, scale: float = 2.0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.table = torch.randn(vocab, vocab, vocab, generator=gen) * scale

    def tree_logits(self, tree, prev2, prev1):
        """Target logits ``[R, B+1, V]`` at the root (last committed token ``prev1``) and every node."""
        tokens = torch.cat([prev1.unsqueeze(1), tree.token_ids.clamp(min=0)], 1)
        before = torch.cat([prev2.unsqueeze(1), tokens.gather(1, tree.parents)], 1)
        return self.table[before, tokens]

    def draft_logits(self, prev2, prev1, depth, noise, gen, sharp=False):
        """Per-depth marginals of the target (a good drafter), perturbed by ``noise``."""
        probs = self.table.softmax(-1)  # [a, b, c] = P(c | a, b)
        state = torch.zeros(prev1.shape[0], self.vocab, self.vocab)
        state[torch.arange(prev1.shape[0]), prev2, prev1] = 1.0
        rows = []
        for _ in range(depth):
            state = torch.einsum("rab,abc->rbc", state, probs)
            rows.append(state.sum(1))
        logits = torch.log(torch.stack(rows, 1)) + noise * torch.randn(prev1.shape[0], depth, self.vocab, generator=gen)
        if sharp:  # one finite token per depth: the tree is a chain
            best = logits.argmax(-1, keepdim=True)
            logits = torch.full_like(logits, float("-inf")).scatter(-1, best, 0.0)
        return logits


def generate_with_trees(target, context, length, sampling, depth, budget, noise=0.5, sharp=False, seed=0):
    """Rounds of :func:`vllm_ddtree.tree_round.tree_round` (draft -> tree -> target -> verify; the toy
    target keeps no KV) until every request has ``length`` tokens.

    Returns the tokens ``[R, length]`` and the number of rounds (target steps) each request took.
    """
    R = sampling.seeds.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.tensor(context).expand(R, -1)
    out = torch.full((R, length + depth + 1), -1, dtype=torch.int64)
    lens = torch.zeros(R, dtype=torch.int64)
    rounds = torch.zeros(R, dtype=torch.int64)  # target steps each request took
    while (lens < length).any():
        full = torch.cat([ctx, out], 1)
        prev1 = full.gather(1, (len(context) + lens - 1).unsqueeze(1)).squeeze(1)
        prev2 = full.gather(1, (len(context) + lens - 2).unsqueeze(1)).squeeze(1)
        _, verdict = tree_round(target.draft_logits(prev2, prev1, depth, noise, gen, sharp), budget,
                                lambda tree: target.tree_logits(tree, prev2, prev1), sampling,
                                root_positions=len(context) - 1 + lens)
        emitted = verdict.num_accepted + 1
        active = lens < length
        j = torch.arange(depth + 1)
        write = active.unsqueeze(1) & (j < emitted.unsqueeze(1))
        cols = torch.where(write, lens.unsqueeze(1) + j, out.shape[1] - 1)
        out.scatter_(1, cols, torch.where(write, verdict.output_tokens, out.gather(1, cols)))
        lens = torch.where(active, lens + emitted, lens)
        rounds += active.long()
    return out[:, :length], rounds


def generate_sequentially(target, context, length, sampling):
    """Plain autoregressive sampling with the same keyed noise: what the tree rounds must equal."""
    R = sampling.seeds.shape[0]
    seq = torch.tensor(context).expand(R, -1)
    for t in range(length):
        logits = target.table[seq[:, -2], seq[:, -1]].unsqueeze(1)
        positions = torch.full((R, 1), len(context) + t)
        seq = torch.cat([seq, sample_target_tokens(logits, sampling, positions)], 1)
    return seq[:, len(context):]




def main() -> None:
    """The toy demo: one drafter used as a chain (vLLM's DFlash) and as DDTrees of growing budgets."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--depth", type=int, default=7, help="D = drafter block size - 1")
    args = parser.parse_args()

    target = MarkovTarget(args.vocab, seed=0)
    context = [1, 2]
    print(f"toy target: 2nd-order Markov, vocab {args.vocab}; drafter: per-depth marginals + noise, D = {args.depth}")
    print(f"{args.requests} requests x {args.tokens} tokens\n")
    print(f"{'T':>4} {'method':>14} {'tau':>6} {'vs chain':>9} {'= autoregressive':>17}")
    for temperature in (0.0, 1.0):
        sampling = TreeSampling.uniform(args.requests, temperature, seeds=torch.arange(args.requests))
        reference = generate_sequentially(target, context, args.tokens, sampling)
        chain_tau = None
        for name, budget, sharp in [("chain", args.depth, True)] + [(f"ddtree B={b}", b, False) for b in (8, 16, 32, 64)]:
            out, rounds = generate_with_trees(target, context, args.tokens, sampling, args.depth, budget, sharp=sharp)
            tau = args.tokens / rounds.float().mean().item()
            chain_tau = chain_tau or tau
            same = "yes" if torch.equal(out, reference) else "NO"
            print(f"{temperature:>4} {name:>14} {tau:>6.2f} {tau / chain_tau:>8.2f}x {same:>17}")


if __name__ == "__main__":
    main()
