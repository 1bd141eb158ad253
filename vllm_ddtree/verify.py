"""Round step 4, *verify*: the target's logits over the tree -> the accepted path and the bonus token.

In:  a :class:`~vllm_ddtree.tree.DraftTree` (B nodes, depth D), the target's logits for its B+1 rows
     (``[R, B+1, V]``, row 0 = root; or flat ``[T, V]`` as vLLM computes them, request r's root at row
     ``row_starts[r]`` and its nodes after it), the requests' sampling parameters
     (:class:`TreeSampling`) and the root's position ``[R]``.
Out: :class:`TreeVerdict`: ``target_tokens [R, B+1]``, ``accepted_nodes [R, D+1]`` (root first, -1
     after the path), ``num_accepted [R]`` (draft nodes accepted, 0..D) and ``output_tokens [R, D+1]``
     (the accepted path's tokens then the bonus token, -1 after).

Why it is lossless: every node gets one token from the target's own processed distribution at that
node (argmax at T = 0). Walking from the root, we move to the child that carries the target's token,
if the tree has one. The emitted tokens are then exactly a sequential sample from the target: each is
the target's sample given the tokens before it. A sample is the inverse CDF of the node's processed
distribution at one uniform keyed by (seed, position of the sampled token): the nodes on one path sit
at distinct positions, so their uniforms are independent, and a request's output depends on its seed
and its context only, not on the tree.

Processing order follows vLLM's sampler: its logits processors (penalties, bad words, min_tokens,
allowed tokens; :mod:`vllm_ddtree.node_logits`, each node with its path as history), then
temperature, min-p, top-k, top-p. Ties at the top-k cut are
all kept; top-p drops the low tail whose mass is at most 1 - p and always keeps the best token.
Everything is fixed-shape tensor work: no host synchronisation and no loop over requests.

Memory: a sampled row needs its whole processed distribution (softmax, and for top-k/top-p a sort
with int64 indices and a cumulative sum: about 21 bytes per vocabulary entry). Rows are therefore
processed in chunks (:mod:`vllm_ddtree.row_chunks`), so a step's extra memory stays bounded
whatever R x (B+1) is (at R = 64, B = 64, V = 152k the whole step at once would take about 15 GB).
The logits are read in place: the adapter hands vLLM's flat ``[T, V]`` logits, never a gathered copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_ddtree.node_logits import PROCESSING_BYTES_PER_ENTRY, NodeLogitsProcessing, node_processor
from vllm_ddtree.row_chunks import row_chunks
from vllm_ddtree.tree import DraftTree

_MASK32 = 0xFFFFFFFF


@dataclass
class TreeSampling:
    """Per-request sampling parameters, tensors ``[R]`` on the logits' device.

    ``temperature`` 0 means greedy; ``top_k`` <= 0 or >= V, ``top_p`` >= 1 and ``min_p`` <= 0 turn that
    filter off. ``seeds`` key the noise; an unseeded request should get a fresh random seed each step.

    Host-side facts, known without reading the tensors (vLLM's sampling metadata has them), let a step
    skip work it does not need: ``all_greedy`` (every request has T = 0: an argmax is the whole
    verdict), ``all_random`` (every request has T > 0: no argmax at all), ``truncated`` (some request
    may use top-k or top-p: only then is the vocabulary sorted) and ``uses_min_p`` (some request may
    have min-p > 0). The defaults assume the general case.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seeds: torch.Tensor
    all_greedy: bool = False
    all_random: bool = False
    truncated: bool = True
    uses_min_p: bool = True

    @classmethod
    def greedy(cls, num_requests: int, device=None) -> "TreeSampling":
        return cls.uniform(num_requests, temperature=0.0, device=device)

    @classmethod
    def uniform(cls, num_requests: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0, seeds: torch.Tensor | None = None, device=None) -> "TreeSampling":
        """The same parameters for every request (tests, benchmarks)."""
        def full(value, dtype):
            return torch.full((num_requests,), value, dtype=dtype, device=device)
        if seeds is None:
            seeds = torch.arange(num_requests, device=device)
        return cls(full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
                   full(min_p, torch.float32), seeds.to(device=device, dtype=torch.int64),
                   all_greedy=temperature <= 0, all_random=temperature > 0, truncated=0 < top_k or top_p < 1,
                   uses_min_p=min_p > 0)

    def take(self, index: torch.Tensor | slice) -> "TreeSampling":
        """The parameters of request ``index[i]`` for each row i, or of a slice of rows (host flags
        unchanged)."""
        return replace(self, temperature=self.temperature[index], top_k=self.top_k[index],
                       top_p=self.top_p[index], min_p=self.min_p[index], seeds=self.seeds[index])


@dataclass
class TreeVerdict:
    target_tokens: torch.Tensor
    accepted_nodes: torch.Tensor
    num_accepted: torch.Tensor
    output_tokens: torch.Tensor


# Bytes per vocabulary entry of a sampled row at its peak: float32 probabilities, the sorted copy
# and its int64 order, the tail's cumulative sum and a bool mask.
SAMPLE_BYTES_PER_ENTRY = 4 + 4 + 8 + 4 + 1


def verify_tree(tree: DraftTree, target_logits: torch.Tensor, sampling: TreeSampling,
                root_positions: torch.Tensor, row_starts: torch.Tensor | None = None,
                processing: NodeLogitsProcessing | None = None) -> TreeVerdict:
    """Samples the target at every node, then walks the tree: see the module docstring.

    ``target_logits`` is ``[R, B+1, V]``, or flat ``[T, V]`` with ``row_starts [R]``: request r's node
    j at row ``row_starts[r] + j``, up to the next request's start (nodes past its rows are not
    sampled; they must be unused slots of the tree). ``processing``: vLLM's logits processors, applied
    at every node with the node's path as history (:mod:`vllm_ddtree.node_logits`) to float32 copies
    of the rows; ``target_logits`` is never written.
    """
    R, B = tree.token_ids.shape
    dev = tree.token_ids.device
    if row_starts is None:
        if target_logits.dim() != 3 or target_logits.shape[:2] != (R, B + 1):
            raise ValueError(f"target_logits has shape {tuple(target_logits.shape)}, the tree needs "
                             f"[{R}, {B + 1}, V] (or flat logits with row_starts)")
        target_logits = target_logits.reshape(R * (B + 1), target_logits.shape[-1])
        row_starts = torch.arange(R, device=dev) * (B + 1)
    T = target_logits.shape[0]
    row_starts = row_starts.to(torch.int64)
    row_request, row_node = row_layout(row_starts, T, B)
    node_depth = torch.cat([torch.zeros_like(tree.depths[:, :1]), tree.depths], 1)
    row_position = root_positions.to(torch.int64)[row_request] + node_depth[row_request, row_node] + 1
    process = None
    if processing is not None and processing.any:
        process = node_processor(processing, tree, row_request, row_node)
    row_tokens = sample_rows(target_logits, sampling.take(row_request), row_position, process)
    row_ends = torch.cat([row_starts[1:], row_starts.new_full((1,), T)])
    node_rows = row_starts.unsqueeze(1) + torch.minimum(torch.arange(B + 1, device=dev),
                                                        (row_ends - row_starts - 1).unsqueeze(1))
    target_tokens = row_tokens[node_rows.clamp(0, T - 1)]
    accepted_nodes, num_accepted = walk_tree(tree, target_tokens)
    return TreeVerdict(target_tokens, accepted_nodes, num_accepted,
                       _emitted_tokens(tree, target_tokens, accepted_nodes, num_accepted))


def row_layout(row_starts: torch.Tensor, num_rows: int, max_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which request and node each of ``num_rows`` flat logits rows holds: ``(row_request, row_node)``
    ``[T]``, rows grouped by request in order, request r's root at ``row_starts[r]``."""
    rows = torch.arange(num_rows, device=row_starts.device)
    row_request = (torch.bucketize(rows, row_starts, right=True) - 1).clamp(0, row_starts.shape[0] - 1)
    return row_request, (rows - row_starts[row_request]).clamp(0, max_nodes)


def walk_tree(tree: DraftTree, target_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the root, follow the child holding the target's token: ``(accepted_nodes [R, D+1], num_accepted)``."""
    R, B = tree.token_ids.shape
    dev = tree.token_ids.device
    sink = B + 1  # "no matching child": a node whose only successor is itself
    # A node matches when its token is the target's token at its parent. Siblings carry distinct
    # tokens, so each node has at most one matching child; padding (token -1) never matches.
    matches = tree.token_ids == target_tokens.gather(1, tree.parents)
    child_ids = torch.arange(1, B + 1, device=dev).expand(R, -1)
    next_node = torch.full((R, B + 2), -1, dtype=torch.int64, device=dev)
    next_node.scatter_reduce_(1, tree.parents, torch.where(matches, child_ids, -1), reduce="amax")
    next_node = torch.where(next_node < 0, sink, next_node)
    next_node[:, sink] = sink
    path = [torch.zeros(R, 1, dtype=torch.int64, device=dev)]
    for _ in range(tree.max_depth):
        path.append(next_node.gather(1, path[-1]))
    path = torch.cat(path, 1)
    num_accepted = (path[:, 1:] != sink).sum(1)
    return torch.where(path == sink, -1, path), num_accepted


def _emitted_tokens(tree, target_tokens, accepted_nodes, num_accepted):
    R, L = accepted_nodes.shape
    step = torch.arange(L, device=accepted_nodes.device).unsqueeze(0)
    node_tokens = torch.cat([torch.full_like(tree.token_ids[:, :1], -1), tree.token_ids], 1)
    path_tokens = node_tokens.gather(1, accepted_nodes[:, 1:].clamp(min=0))  # [R, D]
    last = accepted_nodes.gather(1, num_accepted.unsqueeze(1))
    bonus = target_tokens.gather(1, last)
    out = torch.cat([path_tokens, torch.full_like(bonus, -1)], 1)
    out = torch.where(step == num_accepted.unsqueeze(1), bonus, out)
    return torch.where(step <= num_accepted.unsqueeze(1), out, -1)


def sample_target_tokens(logits: torch.Tensor, sampling: TreeSampling, positions: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits [R, N, V]`` (request r's parameters, ``positions [R, N]``): see
    :func:`sample_rows`."""
    R, N, V = logits.shape
    request = torch.arange(R, device=logits.device).repeat_interleave(N)
    return sample_rows(logits.reshape(R * N, V), sampling.take(request), positions.reshape(R * N)).view(R, N)


def sample_rows(logits: torch.Tensor, sampling: TreeSampling, positions: torch.Tensor,
                process=None) -> torch.Tensor:
    """One token per row of ``logits [T, V]`` (``sampling`` and ``positions`` per row, ``[T]``): argmax
    where T = 0, else an inverse-CDF sample from the processed distribution at one uniform keyed by
    (seed, position). ``process(chunk, rows)``, if given, first processes a float32 copy of each
    chunk of rows in place (:func:`vllm_ddtree.node_logits.node_processor`).

    Inverse CDF instead of a Gumbel/exponential race: the race needs V keyed noises per row (on two
    CPU cores that hash cost 6 s per step at 164 requests x 17 rows), the CDF needs one.
    """
    if sampling.all_greedy and process is None:
        return logits.argmax(-1)
    T, V = logits.shape
    per_entry = (0 if sampling.all_greedy else SAMPLE_BYTES_PER_ENTRY) + (
        0 if process is None else PROCESSING_BYTES_PER_ENTRY)
    chunks = row_chunks(T, V * per_entry)
    if len(chunks) == 1 and process is None:
        return _sample_chunk(logits, sampling, positions)
    out = torch.empty(T, dtype=torch.int64, device=logits.device)
    for rows in chunks:
        chunk = logits[rows]
        if process is not None:
            chunk = chunk.to(torch.float32, copy=True)
            process(chunk, rows)
        out[rows] = chunk.argmax(-1) if sampling.all_greedy else _sample_chunk(chunk, sampling.take(rows),
                                                                                positions[rows])
    return out


def _sample_chunk(logits: torch.Tensor, sampling: TreeSampling, positions: torch.Tensor) -> torch.Tensor:
    cdf = _processed_rows(logits, sampling).cumsum_(-1)
    # First token whose cumulative weight reaches u * total. u > 0, so a zero-weight token never
    # reaches it before an earlier positive one (and the first token only if it has weight), and
    # u < 1 keeps the target at or below the last entry, so the index stays in range. The CDF runs in
    # vocabulary order whatever the processing did, so a token depends on its request alone.
    target = counter_uniform(sampling.seeds, positions.unsqueeze(1)).squeeze(1) * cdf[:, -1]
    sampled = torch.searchsorted(cdf, target.unsqueeze(-1)).squeeze(-1)
    del cdf
    if sampling.all_random:
        return sampled
    return torch.where(sampling.temperature <= 0, logits.argmax(-1), sampled)


def processed_weights(logits: torch.Tensor, sampling: TreeSampling) -> torch.Tensor:
    """Unnormalised probabilities of ``logits [R, N, V]`` after temperature, min-p, top-k and top-p
    (vLLM's order), in vocabulary order; masked tokens weigh 0."""
    R, N, V = logits.shape
    request = torch.arange(R, device=logits.device).repeat_interleave(N)
    return _processed_rows(logits.reshape(R * N, V), sampling.take(request)).view(R, N, V)


def _processed_rows(logits: torch.Tensor, sampling: TreeSampling) -> torch.Tensor:
    """:func:`processed_weights` of rows ``[T, V]`` with per-row parameters; a new float32 tensor,
    worked on in place so that one sort (values and int64 order) is the largest extra."""
    V = logits.shape[-1]
    temperature = torch.where(sampling.temperature > 0, sampling.temperature, 1.0)
    probs = (logits.float() / temperature.unsqueeze(1)).softmax(-1)
    if sampling.uses_min_p:
        probs.masked_fill_(probs < sampling.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), 0.0)
    if not sampling.truncated:
        return probs

    ascending, order = probs.sort(-1)
    k = torch.where((sampling.top_k <= 0) | (sampling.top_k >= V), V, sampling.top_k)
    kth_largest = ascending.gather(-1, (V - k).unsqueeze(1))
    ascending.masked_fill_(ascending < kth_largest, 0.0)  # ties at the cut are kept
    tail_mass = ascending.cumsum(-1)
    drop = tail_mass <= (1 - sampling.top_p).unsqueeze(1) * tail_mass[:, -1:]
    del tail_mass
    drop[:, -1] = False
    ascending.masked_fill_(drop, 0.0)
    del drop
    return probs.scatter_(-1, order, ascending)  # order is a permutation: every entry is rewritten


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise ``[R, N]``, a pure function of (seed, position).

    A counter-based hash instead of a generator: no state to carry across steps, nothing that depends
    on how many rows a step verifies, one fused expression for the whole batch.
    """
    seeds = seeds.to(torch.int64)
    key = _mix32((seeds & _MASK32) ^ _mix32((seeds >> 32) & _MASK32))
    h = _mix32(key.unsqueeze(1) ^ _mix32((positions.to(torch.int64) + 0x9E3779B9) & _MASK32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 holding values < 2**32.

    Both multipliers are below 2**31, so products stay below 2**63: no signed overflow.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)
