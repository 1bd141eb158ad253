"""vLLM's logits processors at tree nodes (vllm_ddtree/node_logits.py), row for row against vLLM's own
implementations applied to each node's history (the request's output, then the node's path).

The oracle runs vLLM's functions one row at a time: ``apply_penalties`` (the formula vLLM's samplers
use), ``_apply_bad_words_single_batch``, and the ``min_tokens`` / ``allowed_token_ids`` rules of its
``MinTokensLogitsProcessor`` and input batch. Processed rows must be equal bit for bit.
"""

import pytest
import torch
from vllm.model_executor.layers.utils import apply_penalties
from vllm.v1.sample.ops.bad_words import _apply_bad_words_single_batch

from vllm_ddtree.node_logits import ANY_TOKEN, NO_TOKEN, NodeLogitsProcessing, node_paths, node_processor
from vllm_ddtree.tree import build_tree
from vllm_ddtree.verify import TreeSampling, row_layout, verify_tree

V, D = 12, 4


def _pad(rows, value, width=None):
    width = max([len(r) for r in rows] + [width or 0])
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


def _right_aligned(rows, value, width):
    return torch.tensor([[value] * (width - len(r)) + list(r) for r in rows], dtype=torch.int64)


def _case(seed, budget):
    """A batch of trees with flat logits (some requests cut, one without a tree) and every feature."""
    gen = torch.Generator().manual_seed(seed)
    R = 5
    tree = build_tree(torch.randn(R, D, V, generator=gen) * 2, budget)
    tree = tree.cut(torch.tensor([budget, budget // 2, 0, budget, 1]))
    rows_per_request = tree.num_nodes + 1
    row_starts = torch.cat([torch.zeros(1, dtype=torch.int64), rows_per_request.cumsum(0)[:-1]])
    logits = torch.randn(int(rows_per_request.sum()), V, generator=gen) * 3
    outputs = [torch.randint(0, V, (int(n),), generator=gen).tolist() for n in (0, 3, 7, 1, 5)]
    prompts = [torch.randint(0, V, (int(n),), generator=gen).tolist() for n in (4, 1, 6, 2, 3)]
    allowed = [None, list(range(0, V, 2)), None, [1, 2, 3, 5, 8], None]
    min_tokens = [3, 0, 9, 4, 0]
    stops = [[0], [], [0, 5], [0, 11, 3], [2]]
    bad_words = [[[4], [2, 3]], [], [[1, 1, 2]], [[7, 6]], [[int(outputs[4][-1]), 9]]]
    return tree, logits, row_starts, dict(outputs=outputs, prompts=prompts, allowed=allowed, min_tokens=min_tokens,
                                          stops=stops, bad_words=bad_words,
                                          presence=[0.0, 0.5, -0.3, 1.0, 0.0], frequency=[0.0, 0.2, 0.7, -0.4, 0.0],
                                          repetition=[1.0, 1.3, 0.8, 2.0, 1.0])


def _processing(case, features):
    c = case
    p = NodeLogitsProcessing()
    if "allowed" in features:
        p.disallowed = torch.tensor([[a is not None and t not in a for t in range(V)] for a in c["allowed"]])
    if "min_tokens" in features:
        p.min_tokens_left = torch.tensor([m - len(o) for m, o in zip(c["min_tokens"], c["outputs"])])
        p.stop_token_ids = _pad(c["stops"], NO_TOKEN, 1)
    if "penalties" in features:
        p.output_tokens, p.prompt_tokens = _pad(c["outputs"], V), _pad(c["prompts"], V)
        p.presence, p.frequency, p.repetition = (torch.tensor(c[k]) for k in ("presence", "frequency", "repetition"))
    if "bad_words" in features:
        W = max(len(w) for w in c["bad_words"])
        M = max(len(word) - 1 for words in c["bad_words"] for word in words)
        p.bad_word_prefixes = torch.stack([_right_aligned([w[:-1] for w in words] + [[]] * (W - len(words)), ANY_TOKEN, M)
                                           for words in c["bad_words"]])
        p.bad_word_last = _pad([[w[-1] for w in words] for words in c["bad_words"]], NO_TOKEN, W)
        p.output_tail = _right_aligned([o[-M:] if M else [] for o in c["outputs"]], NO_TOKEN, M)
    return p


def _history(tree, r, node):
    path = []
    while node:
        path.append(int(tree.token_ids[r, node - 1]))
        node = int(tree.parents[r, node - 1])
    return path[::-1]


def _oracle(case, tree, logits, row_starts, features):
    c = case
    want = logits.clone()
    request, node = row_layout(row_starts, logits.shape[0], tree.max_nodes)
    for t in range(logits.shape[0]):
        r, j = int(request[t]), int(node[t])
        path = _history(tree, r, j)
        history = c["outputs"][r] + path
        row = want[t]
        if "allowed" in features and c["allowed"][r] is not None:
            row[[v for v in range(V) if v not in c["allowed"][r]]] = float("-inf")
        if "bad_words" in features:
            _apply_bad_words_single_batch(row, c["bad_words"][r], history)
        if "min_tokens" in features and len(history) < c["min_tokens"][r] and c["stops"][r]:
            row[c["stops"][r]] = float("-inf")
        if "penalties" in features:
            prompt = torch.tensor([c["prompts"][r]])
            output = torch.tensor([history], dtype=torch.int64).reshape(1, -1)
            apply_penalties(row.unsqueeze(0), prompt, output, *(torch.tensor([c[k][r]]) for k in
                                                                 ("presence", "frequency", "repetition")))
    return want


FEATURES = [("allowed",), ("bad_words",), ("min_tokens",), ("penalties",),
            ("allowed", "bad_words", "min_tokens", "penalties")]


@pytest.mark.parametrize("features", FEATURES, ids="+".join)
@pytest.mark.parametrize("budget", [4, 16])
def test_processed_rows_equal_vllms_processors_on_each_nodes_history(features, budget):
    for seed in range(4):
        case = _case(seed, budget)
        tree, logits, row_starts, c = case
        request, node = row_layout(row_starts, logits.shape[0], tree.max_nodes)
        got = logits.clone()
        node_processor(_processing(c, features), tree, request, node)(got, slice(None))
        want = _oracle(c, tree, logits, row_starts, features)
        assert torch.equal(got, want)
        assert not torch.equal(want, logits)  # the features change these rows


def test_penalties_from_token_counts_equal_penalties_from_token_lists():
    # vLLM's V2 runner keeps each request's output as token counts and its prompt as a seen-token
    # mask (PenaltiesState): the same rows as from the V1 runner's token lists.
    for seed in range(4):
        tree, logits, row_starts, c = _case(seed, 16)
        request, node = row_layout(row_starts, logits.shape[0], tree.max_nodes)
        lists = _processing(c, FEATURES[-1])
        dense = _processing(c, FEATURES[-1])
        dense.output_counts = torch.stack([torch.bincount(torch.tensor(o, dtype=torch.int64), minlength=V)
                                           for o in c["outputs"]]).to(torch.int32)
        dense.prompt_seen = torch.stack([torch.bincount(torch.tensor(q), minlength=V) > 0 for q in c["prompts"]])
        dense.output_tokens = dense.prompt_tokens = None
        got, want = logits.clone(), logits.clone()
        node_processor(dense, tree, request, node)(got, slice(None))
        node_processor(lists, tree, request, node)(want, slice(None))
        assert torch.equal(got, want)
        assert torch.equal(got, _oracle(c, tree, logits, row_starts, FEATURES[-1]))


def test_processing_in_chunks_equals_one_pass(monkeypatch):
    from vllm_ddtree import row_chunks

    tree, logits, row_starts, c = _case(1, 16)
    p = _processing(c, FEATURES[-1])
    sampling = TreeSampling.greedy(5)
    roots = torch.zeros(5, dtype=torch.int64)
    one_pass = verify_tree(tree, logits, sampling, roots, row_starts=row_starts, processing=p)
    monkeypatch.setattr(row_chunks, "WORKING_SET_BYTES", 3 * V * 40)  # a few rows at a time
    chunked = verify_tree(tree, logits, sampling, roots, row_starts=row_starts, processing=p)
    assert torch.equal(one_pass.target_tokens, chunked.target_tokens)
    # Greedy verification picks the processed argmax; the logits themselves stay raw.
    request, node = row_layout(row_starts, logits.shape[0], tree.max_nodes)
    want = _oracle(c, tree, logits, row_starts, FEATURES[-1]).argmax(-1)
    flat = one_pass.target_tokens[request, node]
    assert torch.equal(flat, want)
    assert not torch.equal(flat, logits.argmax(-1))


def test_node_paths_list_each_nodes_ancestors():
    tree = build_tree(torch.randn(3, D, V, generator=torch.Generator().manual_seed(3)) * 2, 16)
    paths = node_paths(tree)
    for r in range(3):
        assert (paths[r, 0] == NO_TOKEN).all()
        for j in range(1, int(tree.num_nodes[r]) + 1):
            path = _history(tree, r, j)
            assert paths[r, j].tolist() == path + [NO_TOKEN] * (D - len(path))
