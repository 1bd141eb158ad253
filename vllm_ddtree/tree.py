"""Round step 2, *tree*: per-depth draft distributions -> a token tree of at most B nodes.

In:  ``draft_logits [R, D, V]`` (D = drafter block size - 1; row d is the drafter's marginal for depth d+1)
     and a node budget per request (an int, or a ``[R]`` tensor with a static maximum B).
Out: a :class:`DraftTree` of fixed-shape tensors ``[R, B]`` / ``[R, B+1, W]`` on the input's device.

Which nodes: the best-first heap of the DDTree reference (liranringel/ddtree, ``build_ddtree_tree``).
A node is a tuple of per-depth ranks ``(r1..rd)`` into the depth's top-K tokens (K = min(B, V)); its
score is the sum of the chosen log-probs. The heap pops nodes in ascending ``(-score, ranks)`` order
and keeps the first ``budget``. Every log-prob is <= 0, so a node never precedes its parent or its
better sibling; the popped set is therefore prefix-closed and equals the first ``budget`` nodes of the
total order ``(-score, ranks)``.

Tie rule (the reference's, kept exactly): equal scores are ordered by the rank tuples
lexicographically, a prefix before its extensions; ranks follow ``torch.topk``'s order, so tokens with
equal logits rank as topk returns them. Scores are accumulated in float32 as ``parent + logp`` (the
reference's sibling update ``w - lp[r] + lp[r+1]`` is the same sum rewritten; it is NaN for ``-inf``
log-probs and rounds differently, so equality is defined on the direct sum). ``-0.0`` counts as ``0``.

One deliberate difference: a node the drafter gives probability 0 (a ``-inf`` score: masked
vocabulary, or a depth whose logits are all ``-inf``) is never drafted. The reference fills a budget
larger than the number of possible nodes with such nodes, in lexicographic order; they cost verify
compute for tokens the drafter rules out. So ``num_nodes`` can be below the budget.

How, without a heap: keep per depth the best B candidates out of (best B of the previous depth) x
(top K tokens), then take the global best B over all depths. A depth-d node among the best B of its
depth always has its parent among the best B of depth d-1 (its parent's B betters each have a first
child at least as good), so the beams lose nothing. Ties across depths need the rank tuples'
lexicographic order, a scalar here: each beam is kept in lexicographic order, and subtree sizes give
every kept node its preorder index in the kept forest. All of it is O(D) fixed-shape tensor ops, no
host synchronisation and no per-request loop, so it can be captured in a CUDA graph for a fixed
(R, B).

On the host, a heap (``builder="heap"``): the same selection as a real ``heapq`` walk per request over
the top-K copied to the host once, the reference's own algorithm with the tie rule above. It touches
only the nodes it pops and their successors (about B log B work a request, nothing padded to fixed
shapes), so where the host is the device (vLLM's CPU backend) and R x B is small it costs a fraction
of the beams' few hundred small torch ops (on a 2-core CPU at D = 7: 0.05 ms against 2.2 ms at R = 1,
B = 7; 5.6 ms against 8.5 ms at R = B = 64). It syncs with the host and runs Python per node, so it
is never the builder for a GPU (where it still works, through a copy to the host and back).

Nodes are numbered 1..B in pop order (parents before children); node 0 is the root (the committed
bonus token). Unused slots hold token -1, parent 0, depth 1 and score -inf: no target token equals
-1, so they can never be accepted.
"""

from __future__ import annotations

import functools
import heapq
import sys
from array import array
from dataclasses import dataclass

import torch

from vllm_ddtree.row_chunks import row_chunks, rows_per_chunk

# Packed selection keys (larger = selected first), int64:
#   bit 62: valid | bits 30..61: order-preserving float32 score | bits 0..29: inverted tie-break rank.
_TIE_BITS = 30
_TIE_MAX = (1 << _TIE_BITS) - 1
_VALID_BIT = 1 << 62
# build_tree's `builder` values; None picks "kernel" for CUDA tensors and "beams" elsewhere.
BUILDERS = ("beams", "kernel", "heap")
# The heap builder makes the ancestor rows on the host, node by node, up to this many node slots
# (R x B), and with ancestor_bits' torch ops (~0.13 ms at the least on CPU) above it: measured cheaper.
_HOST_BITS_MAX_NODES = 512
# draft_topk's transient bytes per vocabulary entry: the float32 copy and logsumexp's float32 work.
_TOPK_BYTES_PER_ENTRY = 8
# On CPU draft_topk's chunks stay within this: logsumexp's temporaries then come from the allocator's
# free lists instead of fresh pages (measured at R = 64, V = 49152: 3x faster than one 88 MB chunk).
_CPU_TOPK_WORKING_SET_BYTES = 16 << 20


@dataclass
class DraftTree:
    """A batch of token trees, one per request, in fixed shapes.

    ``token_ids [R, B]`` int64 (-1 in unused slots), ``parents [R, B]`` int64 (0 = root, nodes are
    1..B), ``depths [R, B]`` int64 (1..D), ``scores [R, B]`` float32 (path log-probability under the
    drafter), ``num_nodes [R]`` int64 and ``ancestor_bits [R, B+1, W]`` int32 with W = ceil((B+1)/32):
    bit j of row i is set iff node j is node i or one of its ancestors (row 0 is the root);
    ``max_depth`` is the static D.
    """

    token_ids: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor
    num_nodes: torch.Tensor
    ancestor_bits: torch.Tensor
    max_depth: int  # D, static: the longest path a verifier can walk

    @property
    def max_nodes(self) -> int:
        return self.token_ids.shape[1]

    def take(self, index: torch.Tensor | slice) -> "DraftTree":
        """The trees of requests ``index`` (a tensor of request indices or a slice), in that order."""
        return DraftTree(self.token_ids[index], self.parents[index], self.depths[index], self.scores[index],
                         self.num_nodes[index], self.ancestor_bits[index], self.max_depth)

    def cut(self, kept: torch.Tensor) -> "DraftTree":
        """Each request's first ``kept [R]`` nodes in pop order (a prefix is a tree: parents come first)."""
        kept = torch.minimum(kept.to(self.num_nodes.dtype), self.num_nodes)
        used = torch.arange(self.max_nodes, device=kept.device).unsqueeze(0) < kept.unsqueeze(1)
        return DraftTree(torch.where(used, self.token_ids, -1), torch.where(used, self.parents, 0),
                         torch.where(used, self.depths, 1), torch.where(used, self.scores, float("-inf")), kept,
                         self.ancestor_bits, self.max_depth)

    def ancestor_mask(self) -> torch.Tensor:
        """The ancestor bitmask unpacked to ``bool [R, B+1, B+1]`` (tests, CPU attention path)."""
        return unpack_bits(self.ancestor_bits, self.max_nodes + 1)


def draft_topk(draft_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-depth top-k of the drafter's log-softmax: ``(logp [R, D, k] float32, token [R, D, k] int64)``.

    The only pass over the vocabulary; the tree build itself never touches V again. Rows are
    converted to float32 a bounded chunk at a time (as in :mod:`vllm_ddtree.verify`), so the extra
    memory does not grow with R x D; on CPU in smaller chunks (:func:`_cpu_row_chunks`), the same
    values bit for bit.
    """
    R, D, V = draft_logits.shape
    flat = draft_logits.reshape(R * D, V)
    logp = torch.empty(R * D, k, dtype=torch.float32, device=flat.device)
    tokens = torch.empty(R * D, k, dtype=torch.int64, device=flat.device)
    chunks = row_chunks if flat.is_cuda else _cpu_row_chunks
    for rows in chunks(R * D, V * _TOPK_BYTES_PER_ENTRY):
        # The top-k in the logits' own dtype (widening to float32 keeps every value and its order);
        # only the normaliser needs float32 accuracy.
        top_logits, tokens[rows] = torch.topk(flat[rows], k, dim=-1)
        logp[rows] = top_logits.float() - torch.logsumexp(flat[rows].float(), dim=-1, keepdim=True)
    # A depth with every logit masked gives -inf - -inf = NaN; it means "nothing is possible".
    logp = torch.nan_to_num(logp, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    return logp.view(R, D, k), tokens.view(R, D, k)


def _cpu_row_chunks(num_rows: int, bytes_per_row: int) -> list[slice]:
    """:func:`~vllm_ddtree.row_chunks.row_chunks` for draft_topk on CPU: chunks of about
    :data:`_CPU_TOPK_WORKING_SET_BYTES`, of even sizes and of two rows or more. A one-row chunk would
    change the logsumexp's bits: torch's CPU reduction to a single value splits the row over threads."""
    rows = min(rows_per_chunk(bytes_per_row), max(1, _CPU_TOPK_WORKING_SET_BYTES // bytes_per_row))
    count = min(-(-num_rows // rows), max(1, num_rows // 2))
    bounds = [i * num_rows // count for i in range(count + 1)] if count else []
    return [slice(start, end) for start, end in zip(bounds, bounds[1:])]


def build_tree(
    draft_logits: torch.Tensor,
    budget: int | torch.Tensor,
    max_budget: int | None = None,
    max_children: int | None = None,
    builder: str | None = None,
) -> DraftTree:
    """Selects each request's best ``budget`` nodes from its drafter logits ``[R, D, V]``.

    ``budget`` is an int, or a ``[R]`` integer tensor on the logits' device; a tensor needs the static
    ``max_budget`` (the B of every output shape) so that no value is read back to the host.
    ``max_children`` keeps only each depth's top tokens as candidates: 1 with budget D gives DFlash's
    chain (the drafter's argmax at every depth), the baseline that trees are measured against.

    ``builder`` picks how the nodes are selected; all three give the same tree, field for field:

    * ``"beams"``: fixed-shape torch ops (a few hundred small ones), no host sync, CUDA-graph
      capturable; the default on anything but CUDA tensors;
    * ``"kernel"``: one Triton program per request (:mod:`vllm_ddtree.kernels.tree_build`), one
      launch; the default on CUDA tensors;
    * ``"heap"``: a ``heapq`` walk per request on the host, over the top-K read back once; the
      cheapest where the host is the device and R x B is small (module docstring).
    """
    _check_builder(builder)
    if draft_logits.dim() != 3:
        raise ValueError(f"draft_logits must be [R, D, V], got shape {tuple(draft_logits.shape)}")
    if max_children is not None and max_children < 1:
        raise ValueError(f"max_children must be >= 1, got {max_children}")
    max_budget = _static_budget(budget, max_budget)
    k = min(max_budget, draft_logits.shape[-1], max_children or max_budget)
    logp, tokens = draft_topk(draft_logits, k) if k > 0 else (None, None)
    return build_tree_from_topk(logp, tokens, budget, max_budget, shape=draft_logits.shape[:2],
                                device=draft_logits.device, builder=builder)


def _check_builder(builder: str | None) -> None:
    if builder is not None and builder not in BUILDERS:
        raise ValueError(f"builder must be one of {', '.join(map(repr, BUILDERS))} or None, got {builder!r}")


def _static_budget(budget: int | torch.Tensor, max_budget: int | None) -> int:
    if isinstance(budget, torch.Tensor):
        if max_budget is None:
            raise ValueError("a per-request budget tensor needs max_budget, the static tree size B")
        return int(max_budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if max_budget is not None and budget > max_budget:
        raise ValueError(f"budget {budget} exceeds max_budget {max_budget}")
    return int(budget)


def build_tree_from_topk(
    logp: torch.Tensor | None,
    tokens: torch.Tensor | None,
    budget: int | torch.Tensor,
    max_budget: int,
    shape: tuple[int, int] | None = None,
    device: torch.device | None = None,
    builder: str | None = None,
) -> DraftTree:
    """:func:`build_tree` after :func:`draft_topk`: ``logp``/``tokens`` are ``[R, D, K]``, sorted."""
    _check_builder(builder)
    B = max_budget
    if logp is None or B == 0 or logp.shape[1] == 0:
        R = shape[0] if logp is None else logp.shape[0]
        dev = device if logp is None else logp.device
        return empty_tree(R, B, dev, shape[1] if logp is None else logp.shape[1])
    R, D, K = logp.shape
    dev = logp.device
    if builder is None:
        builder = "kernel" if logp.is_cuda else "beams"
    if builder == "heap":
        return _build_tree_heap(logp, tokens, budget, B)
    if isinstance(budget, torch.Tensor):
        budget = budget.to(device=dev, dtype=torch.int64).clamp(0, B)
    else:
        budget = torch.full((R,), budget, dtype=torch.int64, device=dev)
    if builder == "kernel":
        return _build_tree_fused(logp, tokens, budget, B)
    if B * K > _TIE_MAX or D * B > _TIE_MAX:
        raise ValueError(f"budget {B} too large for the packed selection keys")

    # Beams, one per depth, best first. `lexrank` is each entry's position in the lexicographic order
    # of its beam's rank tuples: the tie-break of candidates and the key to the preorder below.
    beam_score, beam_valid, beam_parent, beam_rank, beam_lexrank, beam_lexorder = [], [], [], [], [], []
    score = torch.zeros(R, 1, dtype=torch.float32, device=dev)
    valid = torch.ones(R, 1, dtype=torch.bool, device=dev)
    lexrank = torch.zeros(R, 1, dtype=torch.int64, device=dev)
    for d in range(D):
        parent, rank = _candidate_grid(score.shape[1], K, B, dev)
        cand_score = score[:, parent] + logp[:, d, rank]
        cand_valid = valid[:, parent] & (cand_score > float("-inf"))  # probability 0: never drafted
        tie = lexrank[:, parent] * K + rank
        best = _pack_key(cand_valid, cand_score, tie).topk(min(B, parent.shape[0]), dim=1).indices
        score, valid = cand_score.gather(1, best), cand_valid.gather(1, best)
        lexrank, lexorder = _ranks(torch.where(valid, tie.gather(1, best), _TIE_MAX))
        beam_score.append(score := _pad(score, B, float("-inf")))
        beam_valid.append(valid := _pad(valid, B, False))
        beam_parent.append(_pad(parent[best], B, 0))
        beam_rank.append(_pad(rank[best], B, 0))
        beam_lexrank.append(lexrank := _pad_positions(lexrank, B))
        beam_lexorder.append(_pad_positions(lexorder, B))

    def lex_exclusive_cumsum(x, d):  # sum of x over the entries of beam d that precede each entry
        return _exclusive_cumsum(x.gather(1, beam_lexorder[d])).gather(1, beam_lexrank[d])

    # Preorder index of every kept node in the kept forest = its lexicographic rank among all of them:
    # a node comes after its parent and after the subtrees of its parent's earlier nodes.
    sizes = [v.long() for v in beam_valid]
    for d in range(D - 1, 0, -1):
        # Invalid entries have size 0 and point at entry 0, so they add nothing.
        sizes[d - 1] = sizes[d - 1] + torch.zeros_like(sizes[d - 1]).scatter_add_(1, beam_parent[d], sizes[d])
    preorder = [lex_exclusive_cumsum(sizes[0], 0)]
    for d in range(1, D):
        before_parent = lex_exclusive_cumsum(sizes[d - 1] - beam_valid[d - 1].long(), d - 1)
        preorder.append(preorder[d - 1].gather(1, beam_parent[d]) + 1 + lex_exclusive_cumsum(sizes[d], d)
                        - before_parent.gather(1, beam_parent[d]))

    all_score = torch.cat(beam_score, 1)  # [R, D*B], kept node u = d*B + position
    all_valid = torch.cat(beam_valid, 1)
    key = _pack_key(all_valid, all_score, torch.cat(preorder, 1))
    chosen = key.topk(B, dim=1).indices  # pop order
    slot = torch.arange(B, device=dev)
    num_nodes = torch.minimum(all_valid.sum(1), budget)
    used = slot.unsqueeze(0) < num_nodes.unsqueeze(1)

    depth0 = chosen // B  # 0-based depth
    all_tokens = tokens.gather(2, torch.stack(beam_rank, 1)).flatten(1)  # [R, D*B]
    all_parent_u = torch.cat([torch.full_like(beam_parent[0], -1)]
                             + [p + d * B for d, p in enumerate(beam_parent[1:])], 1)
    node_of_u = torch.zeros(R, D * B, dtype=torch.int64, device=dev)
    node_of_u.scatter_(1, chosen, torch.where(used, slot + 1, 0))
    parent_u = all_parent_u.gather(1, chosen)
    parents = torch.where(parent_u >= 0, node_of_u.gather(1, parent_u.clamp(min=0)), 0)

    token_ids = torch.where(used, all_tokens.gather(1, chosen), -1)
    parents = torch.where(used, parents, 0)
    depths = torch.where(used, depth0 + 1, 1)
    scores = torch.where(used, all_score.gather(1, chosen), float("-inf"))
    return DraftTree(token_ids, parents, depths, scores, num_nodes,
                     ancestor_bits(parents, D), D)


def _build_tree_fused(logp: torch.Tensor, tokens: torch.Tensor, budget: torch.Tensor, B: int) -> DraftTree:
    """The same selection as the beams above, as one Triton program per request walking the heap
    itself (:mod:`vllm_ddtree.kernels.tree_build`): one launch instead of a few hundred small kernels."""
    import triton

    from vllm_ddtree.kernels.tree_build import tree_build_kernel

    R, D, K = logp.shape
    dev = logp.device
    words = (B + 32) // 32
    long = dict(dtype=torch.int64, device=dev)
    token_ids, parents, depths = (torch.empty(R, B, **long) for _ in range(3))
    scores = torch.empty(R, B, dtype=torch.float32, device=dev)
    num_nodes = torch.empty(R, **long)
    bits = torch.empty(R, B + 1, words, dtype=torch.int32, device=dev)
    if R:
        nodes, words_pad = triton.next_power_of_2(B + 1), triton.next_power_of_2(words)
        tree_build_kernel[(R,)](
            logp.float().contiguous(), tokens.contiguous(), budget.contiguous(),
            token_ids, parents, depths, scores, num_nodes, bits, D, K,
            B=B, NODES=nodes, WORDS=words, WORDS_PAD=words_pad, ROW_CHUNK=min(nodes, max(1, 1024 // words_pad)),
            # A pop is a chain of reductions over NODES values: one warp (shuffles only) while they fit.
            num_warps=max(1, min(8, nodes // 128)))
    return DraftTree(token_ids, parents, depths, scores, num_nodes, bits, D)


def _build_tree_heap(logp: torch.Tensor, tokens: torch.Tensor, budget: int | torch.Tensor, B: int) -> DraftTree:
    """The same selection as the beams above, as the reference computes it: a ``heapq`` walk per request
    on the host. The top-K is copied once into flat host arrays and the outputs are written into
    others that become the output tensors as they are (no Python list of every element either way)."""
    R, D, K = logp.shape
    dev = logp.device
    if not logp.numel():
        return empty_tree(R, B, dev, D)
    lp, tok = _host_array("f", torch.float32, logp), _host_array("q", torch.int64, tokens)
    budgets = budget.tolist() if isinstance(budget, torch.Tensor) else [budget] * R
    ninf = float("-inf")
    f32 = array("f", [0.0])  # a Python float stored here and read back is rounded to float32
    token_ids, parents, depths = array("q", [-1]) * (R * B), array("q", [0]) * (R * B), array("q", [1]) * (R * B)
    scores, num_nodes = array("f", [ninf]) * (R * B), array("q", [0]) * R
    # The ancestor rows: built on the host node by node, or (many nodes) by ancestor_bits afterwards.
    host_bits = R * B <= _HOST_BITS_MAX_NODES and sys.byteorder == "little"
    row_bytes = 4 * ((B + 32) // 32)
    pad_rows, bit_rows = _padding_bit_rows(B) if host_bits else b"", []
    push, pop, replace = heapq.heappush, heapq.heappop, heapq.heapreplace
    for r in range(R):
        b = min(max(int(budgets[r]), 0), B)
        k = min(b, K)  # a node of rank >= b follows its b better siblings
        first = r * D * K  # flat index of (r, depth 1, rank 0)
        rows = [1]  # ancestor bits of node 0 (the root), 1, 2, ... as Python ints
        # Entries (-score, ranks, score, parent node, parent score, depth, rank, flat index): the key
        # (-score, ranks) is unique, so a comparison never reaches the payload. A -inf node would end
        # the selection when popped, and so would its children and later siblings: it is never pushed.
        score = 0.0 + lp[first] if k else ninf  # 0.0 + turns -0.0 into 0.0 (exact: lp is float32)
        heap = [(-score, (0,), score, 0, 0.0, 1, 0, first)] if score > ninf else []
        n, out = 0, r * B
        while heap and n < b:
            # The best node is popped by its first successor replacing it (one sift instead of two).
            _, ranks, score, parent, parent_score, depth, rank, at = heap[0]
            token_ids[out], parents[out], depths[out], scores[out] = tok[at], parent, depth, score
            n += 1
            out += 1
            if host_bits:
                rows.append(rows[parent] | (1 << n))
            child = sibling = None
            if depth < D:
                below = first + depth * K  # (depth + 1, rank 0)
                f32[0] = score + lp[below]
                value = f32[0]
                if value > ninf:
                    child = (-value, ranks + (0,), value, n, score, depth + 1, 0, below)
            if rank + 1 < k:
                f32[0] = parent_score + lp[at + 1]
                value = f32[0]
                if value > ninf:
                    sibling = (-value, ranks[:-1] + (rank + 1,), value, parent, parent_score, depth, rank + 1, at + 1)
            if child is None:
                child, sibling = sibling, None
            if child is None:
                pop(heap)
            else:
                replace(heap, child)
                if sibling is not None:
                    push(heap, sibling)
        num_nodes[r] = n
        if host_bits:
            bit_rows.append(b"".join([row.to_bytes(row_bytes, "little") for row in rows]))
            bit_rows.append(pad_rows[(n + 1) * row_bytes:])
    if host_bits:
        bits = torch.frombuffer(bytearray(b"".join(bit_rows)), dtype=torch.int32).view(R, B + 1, -1).to(dev)
    else:
        bits = ancestor_bits(torch.frombuffer(parents, dtype=torch.int64).view(R, B).to(dev), D)

    def tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
        return torch.frombuffer(values, dtype=dtype).to(dev)

    return DraftTree(tensor(token_ids, torch.int64).view(R, B), tensor(parents, torch.int64).view(R, B),
                     tensor(depths, torch.int64).view(R, B), tensor(scores, torch.float32).view(R, B),
                     tensor(num_nodes, torch.int64), bits, D)


def _host_array(typecode: str, dtype: torch.dtype, values: torch.Tensor) -> array:
    """``values`` flattened into a new host ``array`` of ``typecode`` (``dtype``'s), in one copy."""
    host = array(typecode, [0]) * values.numel()
    torch.frombuffer(host, dtype=dtype).copy_(values.reshape(-1))
    return host


@functools.lru_cache(maxsize=None)
def _padding_bit_rows(B: int) -> bytes:
    """The packed ancestor rows of nodes 0..B with no node drafted (bits 0 and i of row i), as the
    little-endian bytes of their int32 words; the heap builder appends each tree's unused rows from it."""
    row_bytes = 4 * ((B + 32) // 32)
    return b"".join([(1 | 1 << i).to_bytes(row_bytes, "little") for i in range(B + 1)])


def _pack_key(valid: torch.Tensor, score: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """Larger key = earlier in ``(valid first, -score, tie)`` order."""
    bits = (score + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)  # monotone in the float value
    return valid.long() * _VALID_BIT + (ordered << _TIE_BITS) + (_TIE_MAX - tie)


@functools.lru_cache(maxsize=None)
def _candidate_grid(parents: int, k: int, budget: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(parent entry, rank) pairs that can reach a beam of ``budget``, as two ``[C]`` index tensors.

    Parents are in selection order and ranks sorted, so candidate (t, r) is preceded by every (t', r')
    with t' <= t, r' <= r: it can only be among the best ``budget`` if (t+1)(r+1) <= budget. That keeps
    about B ln B of the B x K pairs. Built once per shape, outside any CUDA graph capture.
    """
    pairs = [(t, r) for t in range(parents) for r in range(k) if (t + 1) * (r + 1) <= budget]
    grid = torch.tensor(pairs, dtype=torch.int64, device=device)
    return grid[:, 0].contiguous(), grid[:, 1].contiguous()


def _ranks(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each entry in ascending ``key`` order, the entry at each rank), per row."""
    order = key.argsort(dim=1, stable=True)
    positions = torch.arange(key.shape[1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions), order


def _pad_positions(x: torch.Tensor, width: int) -> torch.Tensor:
    """Pads a per-row permutation of 0..n-1 to one of 0..width-1 (padding ranks after every entry)."""
    extra = torch.arange(x.shape[1], width, device=x.device).expand(x.shape[0], -1)
    return torch.cat([x, extra], 1)


def _pad(x: torch.Tensor, width: int, value) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(1) - x


def ancestor_bits(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Packed ancestor rows ``int32 [R, B+1, W]`` of ``parents [R, B]``: row i has bit i and the bits of
    i's ancestors (row 0 is the root). Pointer doubling on the packed words: a row ORs in the row of
    its 2^k-th ancestor, O(log D) steps of ``[R, B+1, W]`` work, never an unpacked ``[B+1, B+1]`` mask.
    """
    R, B = parents.shape
    dev = parents.device
    words = (B + 32) // 32
    node = torch.arange(B + 1, device=dev)
    own = torch.zeros(B + 1, words, dtype=torch.int64, device=dev)
    own[node, node // 32] = 1 << (node % 32)
    bits = _as_int32(own).expand(R, -1, -1).clone()
    jump = torch.cat([torch.zeros(R, 1, dtype=torch.int64, device=dev), parents], 1)  # root -> root
    covered = 1  # rows hold every ancestor closer than `covered` steps
    while covered <= max_depth:
        bits |= bits.gather(1, jump.unsqueeze(2).expand(-1, -1, words))
        jump = jump.gather(1, jump)
        covered *= 2
    return bits


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 of the same 32 bits."""
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``bool [..., N]`` -> ``int32 [..., ceil(N/32)]``, bit j of word w = element 32 w + j."""
    n = mask.shape[-1]
    words = (n + 31) // 32
    padded = torch.nn.functional.pad(mask, (0, words * 32 - n)).view(*mask.shape[:-1], words, 32)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    return _as_int32((padded.long() * weights).sum(-1))


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``int32 [..., W]`` -> ``bool [..., n]``."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.flatten(-2)[..., :n].bool()


def empty_tree(R: int, B: int, device, max_depth: int) -> DraftTree:
    """``R`` trees of no node, in the shapes of budget ``B`` (requests that verify nothing this step)."""
    long = dict(dtype=torch.int64, device=device)
    parents = torch.zeros(R, B, **long)
    return DraftTree(
        token_ids=torch.full((R, B), -1, **long),
        parents=parents,
        depths=torch.ones(R, B, **long),
        scores=torch.full((R, B), float("-inf"), device=device),
        num_nodes=torch.zeros(R, **long),
        ancestor_bits=ancestor_bits(parents, 1),
        max_depth=max_depth,
    )
