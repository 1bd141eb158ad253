"""Round step 4a, *node logits*: vLLM's per-request logits processors at every node of a tree.

A tree node's logits row is the target's distribution for the token after the node's path, so a
processor that looks at the request's history (penalties, bad words, ``min_tokens``) must see the
output so far *followed by the node's path*, as vLLM's rejection sampler gives each chain position
the output followed by the drafts before it. Processors that do not look at the history
(``allowed_token_ids``) apply to every row of the request.

In:  :class:`NodeLogitsProcessing` (per-request state as tensors, each feature optional), the trees,
     and each logits row's request and node (as :func:`vllm_ddtree.verify.verify_tree` lays them out).
Out: a function that processes a float32 chunk of rows in place, which the verifier calls before it
     samples the chunk; the logits themselves are never written (raw logprobs stay raw).

Each processor follows vLLM's own formula (``vllm/v1/sample``): ``allowed_token_ids`` masks the
disallowed tokens; a bad word bans its last token where the history ends with its other tokens;
``min_tokens`` bans the stop tokens at rows whose sampled token would come before the minimum;
penalties scale (repetition: tokens in the prompt or the history) and shift (frequency: by count in
the history; presence: once if in the history) the logits, in vLLM's order. All of it is fixed-shape
tensor work per chunk of rows: no host read, no loop over requests or nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_ddtree.tree import DraftTree

# Transient bytes per vocabulary entry of a processed chunk: the float32 copy, the history's int32
# counts, two bool masks and the float32 scaling of the penalties.
PROCESSING_BYTES_PER_ENTRY = 4 + 4 + 1 + 1 + 4
NO_TOKEN = -1      # padding of histories and stop lists: never equal to a token
ANY_TOKEN = -2     # padding of bad-word prefixes (right-aligned): matches any history token


@dataclass
class NodeLogitsProcessing:
    """Per-request processor state, ``R`` requests in the verifier's request order; ``None`` = feature
    unused by every request of the step. A request that does not use a feature gets its neutral
    values (no banned token, zero penalties and repetition 1, ``min_tokens_left`` 0, no bad word).

    * ``disallowed [R, V]`` bool: tokens outside the request's ``allowed_token_ids``.
    * ``min_tokens_left [R]`` int64 (tokens the request must still emit before a stop token may come)
      and ``stop_token_ids [R, S]`` int64 (padded with ``NO_TOKEN``).
    * the request's history for penalties: its output as ``output_tokens [R, O]`` int64 (padded with V,
      vLLM's padding) or as ``output_counts [R, V]`` int32 (each token's count: what vLLM's V2 runner
      keeps), and its prompt as ``prompt_tokens [R, P]`` int64 (padded with V) or as ``prompt_seen
      [R, V]`` bool; with ``presence``, ``frequency`` and ``repetition [R]`` float32 penalties.
    * ``bad_word_prefixes [R, W, M]`` int64 (each bad word but its last token, right-aligned, padded
      with ``ANY_TOKEN``), ``bad_word_last [R, W]`` (its last token; ``NO_TOKEN`` for padding words)
      and ``output_tail [R, M]`` (the last M output tokens, right-aligned, padded with ``NO_TOKEN``).
    """

    disallowed: torch.Tensor | None = None
    min_tokens_left: torch.Tensor | None = None
    stop_token_ids: torch.Tensor | None = None
    output_tokens: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None
    prompt_tokens: torch.Tensor | None = None
    prompt_seen: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    bad_word_prefixes: torch.Tensor | None = None
    bad_word_last: torch.Tensor | None = None
    output_tail: torch.Tensor | None = None

    @property
    def penalized(self) -> bool:
        return self.presence is not None

    @property
    def any(self) -> bool:
        return any(x is not None for x in (self.disallowed, self.min_tokens_left, self.presence, self.bad_word_last))


def node_paths(tree: DraftTree) -> torch.Tensor:
    """``[R, B+1, D]`` int64: the tokens on each node's path from the root (depth 1 first), padded
    with ``NO_TOKEN``; row 0 (the root) and unused slots hold none beyond their own token."""
    R, B = tree.token_ids.shape
    D = tree.max_depth
    dev = tree.token_ids.device
    parents = torch.cat([torch.zeros(R, 1, dtype=torch.int64, device=dev), tree.parents], 1)
    tokens = torch.cat([torch.full((R, 1), NO_TOKEN, dtype=torch.int64, device=dev), tree.token_ids], 1)
    depths = torch.cat([torch.zeros(R, 1, dtype=torch.int64, device=dev), tree.depths], 1)
    paths = torch.full((R, B + 1, D + 1), NO_TOKEN, dtype=torch.int64, device=dev)  # column D: scratch
    current = torch.arange(B + 1, device=dev).expand(R, -1)
    for _ in range(D):  # climb one level per round; a node at the root writes the scratch column
        depth = depths.gather(1, current)
        column = torch.where(depth > 0, depth - 1, D).unsqueeze(2)
        paths.scatter_(2, column, tokens.gather(1, current).unsqueeze(2))
        current = parents.gather(1, current)
    return paths[..., :D]


def node_processor(processing: NodeLogitsProcessing, tree: DraftTree, row_request: torch.Tensor,
                   row_node: torch.Tensor):
    """``process(chunk, rows)``: applies ``processing`` in place to ``chunk`` (float32 ``[n, V]``),
    the logits rows ``rows`` (a slice), whose requests and nodes are ``row_request``/``row_node [T]``."""
    paths = node_paths(tree)
    row_path = paths[row_request, row_node]  # [T, D]
    row_depth = torch.cat([torch.zeros_like(tree.depths[:, :1]), tree.depths], 1)[row_request, row_node]
    p = processing

    def process(chunk: torch.Tensor, rows: slice) -> None:
        req, path, depth = row_request[rows], row_path[rows], row_depth[rows]
        n, V = chunk.shape
        neg_inf = float("-inf")
        if p.disallowed is not None:
            chunk.masked_fill_(p.disallowed[req], neg_inf)
        if p.bad_word_last is not None:
            M = p.bad_word_prefixes.shape[-1]
            history = torch.cat([p.output_tail[req], path], 1)  # the tail, then the path's tokens
            recent = history.gather(1, depth.unsqueeze(1) + torch.arange(M, device=chunk.device))  # last M
            prefixes, last = p.bad_word_prefixes[req], p.bad_word_last[req]
            match = ((prefixes == recent.unsqueeze(1)) | (prefixes == ANY_TOKEN)).all(-1) & (last >= 0)
            banned = torch.zeros(n, V + 1, dtype=torch.int32, device=chunk.device)
            banned.scatter_add_(1, torch.where(last >= 0, last, V), match.to(torch.int32))
            chunk.masked_fill_(banned[:, :V] > 0, neg_inf)
        if p.min_tokens_left is not None:
            # The token sampled at a node of depth d is the request's output number len(output) + d.
            early = depth < p.min_tokens_left[req]
            stops = p.stop_token_ids[req]
            stopped = torch.zeros(n, V + 1, dtype=torch.bool, device=chunk.device)
            stopped.scatter_(1, torch.where(stops >= 0, stops, V), early.unsqueeze(1).expand_as(stops))
            chunk.masked_fill_(stopped[:, :V], neg_inf)
        if p.penalized:
            _penalize(chunk, p, req, path)

    return process


def _penalize(chunk: torch.Tensor, p: NodeLogitsProcessing, req: torch.Tensor, path: torch.Tensor) -> None:
    """vLLM's ``apply_penalties`` on rows whose output is the request's output plus the node's path."""
    n, V = chunk.shape
    counts = torch.zeros(n, V + 1, dtype=torch.int32, device=chunk.device)
    if p.output_counts is not None:
        counts[:, :V] = p.output_counts[req]
    else:
        output = p.output_tokens[req]
        counts.scatter_add_(1, output, torch.ones_like(output, dtype=torch.int32))
    counts.scatter_add_(1, torch.where(path >= 0, path, V), torch.ones_like(path, dtype=torch.int32))
    counts = counts[:, :V]
    in_output = counts > 0
    if p.prompt_seen is not None:
        in_prompt = p.prompt_seen[req]
    else:
        in_prompt = torch.zeros(n, V + 1, dtype=torch.bool, device=chunk.device)
        in_prompt.scatter_(1, p.prompt_tokens[req], True)
        in_prompt = in_prompt[:, :V]
    repetition = torch.where(in_prompt | in_output, p.repetition[req].unsqueeze(1), 1.0)
    del in_prompt
    chunk *= torch.where(chunk > 0, 1.0 / repetition, repetition)
    del repetition
    chunk -= p.frequency[req].unsqueeze(1) * counts
    chunk -= p.presence[req].unsqueeze(1) * in_output
