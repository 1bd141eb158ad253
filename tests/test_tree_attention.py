"""The tree-attention kernel against the dense-mask torch reference, on mixed paged batches."""

import pytest
import torch

from vllm_ddtree.tree import build_tree, pack_bits
from vllm_ddtree.kv_commit import paged_kv_views
from vllm_ddtree.tree_attention import (TreeAttentionMetadata, cpu_kernel, tree_attention, tree_attention_cpu,
                                        tree_attention_dense, tree_attention_reference, visibility_mask)


def _tree_bits(shape, budget, gen):
    """Ancestor bits ``[budget+1, W]`` of a tree of the given shape."""
    n = budget + 1
    if shape == "chain":
        return pack_bits(torch.ones(n, n, dtype=torch.bool).tril())
    if shape == "star":
        return build_tree(torch.randn(1, 1, budget + 3, generator=gen), budget).ancestor_bits[0]
    if shape == "empty":  # budget slots, no node: padding rows see the root and themselves
        return build_tree(torch.randn(1, 3, 5, generator=gen), torch.tensor([0]), max_budget=budget).ancestor_bits[0]
    return build_tree(torch.randn(1, 6, 4, generator=gen) * 2, budget).ancestor_bits[0]  # "deep"


def make_batch(requests, budget, page, kv_heads, group, head_dim, dtype, layout, gen, device, with_cache=False):
    """``requests``: list of (kind, context_len, query_len); kind "tree:<shape>" has query_len budget+1.
    Returns query, key view, value view, metadata (and the whole cache tensor if ``with_cache``)."""
    q_lens = [q for _, _, q in requests]
    seq_lens = [c + q for _, c, q in requests]
    blocks_per_req = max(seq_lens) // page + 1
    R = len(requests)
    num_blocks = R * blocks_per_req + 3
    block_table = torch.randperm(num_blocks, generator=gen)[: R * blocks_per_req].view(R, blocks_per_req)
    words = (budget + 1 + 31) // 32
    tree_bits = torch.zeros(R, budget + 1, words, dtype=torch.int32)
    tree_rows = torch.zeros(R, dtype=torch.int32)
    for r, (kind, _, q_len) in enumerate(requests):
        if kind.startswith("tree"):
            assert q_len == budget + 1
            tree_bits[r] = _tree_bits(kind.split(":")[1], budget, gen)
            tree_rows[r] = budget + 1
    shape = {"vllm": (num_blocks, kv_heads, page, 2 * head_dim), "cpu": (num_blocks, kv_heads, page, 2 * head_dim),
             "cpu_amx": (num_blocks, kv_heads, page, 2 * head_dim),
             "flash_attn": (2, num_blocks, page, kv_heads, head_dim)}[layout]
    kv_cache = (torch.randn(shape, generator=gen) * 2).to(dtype)
    query = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    meta = TreeAttentionMetadata(
        query_start_loc=torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table.to(torch.int32), tree_bits=tree_bits, tree_rows=tree_rows)
    meta = TreeAttentionMetadata(*[t.to(device) for t in vars(meta).values() if t is not None])
    kv_cache = kv_cache.to(device)
    keys, values = paged_kv_views(kv_cache, layout)
    return (query.to(device), keys, values, meta) + ((kv_cache,) if with_cache else ())


MIXED = [("tree:deep", 37, 16), ("prefill", 0, 23), ("decode", 70, 1), ("tree:chain", 5, 16),
         ("tree:star", 0, 16), ("prefill", 40, 9), ("tree:empty", 33, 16), ("decode", 0, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page", [16, 32])
def test_kernel_matches_reference_mixed_batch(dtype, group, page, device):
    gen = torch.Generator().manual_seed(group * 100 + page)
    query, keys, values, meta = make_batch(MIXED, 15, page, 2, group, 64, dtype, "vllm", gen, device)
    got = tree_attention(query, keys, values, meta, scale=0.125)
    want = tree_attention_reference(query, keys, values, meta, scale=0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("block_n", [16, 32, 128])
@pytest.mark.parametrize("page", [16, 64])
def test_key_tiles_spanning_or_splitting_pages(block_n, page, device):
    # A key tile may cover several scattered KV blocks (block_n > page) or part of one (block_n < page).
    gen = torch.Generator().manual_seed(block_n + page)
    query, keys, values, meta = make_batch(MIXED, 15, page, 2, 4, 64, torch.bfloat16, "vllm", gen, device)
    got = tree_attention(query, keys, values, meta, scale=0.125, block_n=block_n)
    want = tree_attention_reference(query, keys, values, meta, scale=0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_block_n_must_be_a_power_of_two(device):
    gen = torch.Generator().manual_seed(0)
    query, keys, values, meta = make_batch(MIXED[:2], 15, 16, 2, 4, 64, torch.bfloat16, "vllm", gen, device)
    with pytest.raises(ValueError, match="block_n 48"):
        tree_attention(query, keys, values, meta, scale=0.125, block_n=48)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("layout", ["vllm", "flash_attn", "cpu"])
def test_head_dims_and_layouts(head_dim, layout, device):
    gen = torch.Generator().manual_seed(head_dim)
    requests = [("tree:deep", 20, 9), ("prefill", 3, 5), ("decode", 17, 1)]
    query, keys, values, meta = make_batch(requests, 8, 16, 1, 4, head_dim, torch.float16, layout, gen, device)
    got = tree_attention(query, keys, values, meta, scale=head_dim ** -0.5)
    want = tree_attention_reference(query, keys, values, meta, scale=head_dim ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("context", [0, 31, 32, 33, 700, 2048])
def test_context_lengths_cross_blocks(context, device):
    gen = torch.Generator().manual_seed(context)
    requests = [("tree:deep", context, 33), ("decode", context, 1)]
    query, keys, values, meta = make_batch(requests, 32, 32, 1, 8, 64, torch.bfloat16, "vllm", gen, device)
    got = tree_attention(query, keys, values, meta, scale=0.125)
    want = tree_attention_reference(query, keys, values, meta, scale=0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_chain_tree_is_exactly_causal(device):
    # Wiring control: a chain's ancestor mask is the causal mask, so the tree path must give the
    # causal path's result bit for bit.
    gen = torch.Generator().manual_seed(11)
    requests = [("tree:chain", 45, 17), ("tree:chain", 0, 17), ("tree:chain", 100, 17)]
    query, keys, values, meta = make_batch(requests, 16, 16, 2, 4, 64, torch.float16, "vllm", gen, device)
    tree_out = tree_attention(query, keys, values, meta, scale=0.125)
    causal = TreeAttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.block_table, meta.tree_bits,
                                   torch.zeros_like(meta.tree_rows))
    assert torch.equal(tree_out, tree_attention(query, keys, values, causal, scale=0.125))
    for r in range(3):
        assert torch.equal(visibility_mask(meta, r), visibility_mask(causal, r))


def test_tree_rows_see_only_ancestors(device):
    # A star: every node sees the context, the root and itself, never a sibling. Make one sibling's
    # value huge; no other node's output may move.
    gen = torch.Generator().manual_seed(5)
    query, keys, values, meta = make_batch([("tree:star", 10, 9)], 8, 16, 1, 1, 64, torch.float32, "vllm", gen, device)
    base = tree_attention(query, keys, values, meta, scale=0.125)
    block = int(meta.block_table[0, (10 + 3) // 16])
    values[block, (10 + 3) % 16] += 1000.0  # node 3's value
    moved = tree_attention(query, keys, values, meta, scale=0.125)
    changed = (moved - base).abs().amax(dim=(1, 2)) > 1e-3
    assert changed.tolist() == [r == 3 for r in range(9)]


@pytest.mark.parametrize("layout", ["cpu", "cpu_amx", "vllm", "flash_attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_cpu_path_matches_reference(layout, dtype):
    # The CPU backend's path: requests of equal query length batched into one masked SDPA, reading
    # the layer's cache through its views or (the AMX layout) by flat indices.
    gen = torch.Generator().manual_seed(3)
    requests = MIXED + [("tree:deep", 50, 16), ("decode", 3, 1), ("tree:chain", 0, 16), ("prefill", 7, 9)]
    query, keys, values, meta, kv_cache = make_batch(requests, 15, 16, 2, 4, 64, dtype, layout, gen, "cpu",
                                                     with_cache=True)
    got = tree_attention_dense(query, kv_cache, layout, meta, scale=0.125)
    want = tree_attention_reference(query, keys, values, meta, scale=0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("page,head_dim,group", [(16, 64, 4), (32, 128, 1), (128, 64, 3), (64, 256, 2), (16, 32, 2),
                                                 (32, 80, 1), (128, 96, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_matches_reference(page, head_dim, group, dtype):
    # The C++ kernel reading vLLM's CPU cache ("cpu" layout) in place: mixed batches (trees of every
    # shape, prefills, decodes, empty contexts, contexts over several blocks), against the reference.
    assert cpu_kernel() is not None, "the C++ kernel must build here (a C++ compiler is part of the test setup)"
    gen = torch.Generator().manual_seed(page + head_dim + group)
    requests = MIXED + [("tree:deep", 300, 16), ("decode", 517, 1), ("tree:chain", page - 3, 16)]
    query, keys, values, meta, kv_cache = make_batch(requests, 15, page, 2, group, head_dim, dtype, "cpu", gen,
                                                     "cpu", with_cache=True)
    got = tree_attention_cpu(query, kv_cache, meta, scale=head_dim ** -0.5)
    want = tree_attention_reference(query, keys, values, meta, scale=head_dim ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_cpu_kernel_chain_is_causal_and_padding_is_unread():
    # A tree that is a chain gives the causal result (what vLLM's kernel computes for a chain's rows),
    # and keys past each request's length, in the same blocks, are never read: NaN there changes nothing.
    gen = torch.Generator().manual_seed(11)
    chain = [("tree:chain", 45, 16), ("tree:chain", 130, 16)]
    causal = [("prefill", 45, 16), ("prefill", 130, 16)]
    query, keys, values, meta, kv_cache = make_batch(chain, 15, 32, 2, 3, 64, torch.float32, "cpu", gen, "cpu",
                                                     with_cache=True)
    as_tree = tree_attention_cpu(query, kv_cache, meta, scale=0.125)
    as_causal = tree_attention_cpu(query, kv_cache, TreeAttentionMetadata(
        meta.query_start_loc, meta.seq_lens, meta.block_table, meta.tree_bits, torch.zeros_like(meta.tree_rows)),
        scale=0.125)
    torch.testing.assert_close(as_tree, as_causal, atol=1e-6, rtol=1e-6)
    for r, (_, context, rows) in enumerate(causal):
        end = context + rows
        for view in (keys, values):
            view[int(meta.block_table[r, end // 32]), end % 32:] = float("nan")
    assert torch.equal(tree_attention_cpu(query, kv_cache, meta, scale=0.125), as_tree)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("group", [1, 8])
def test_split_k_matches_reference(num_splits, group, device):
    # Split-K: each tile's keys in num_splits ranges, merged by log-sum-exp. Contexts from empty to
    # longer than every split together, so that some splits see no key at all (7 splits of a 1-row
    # decode with no context) and some ranges end inside a tree.
    gen = torch.Generator().manual_seed(num_splits * 10 + group)
    requests = MIXED + [("tree:deep", 300, 16), ("decode", 517, 1)]
    query, keys, values, meta = make_batch(requests, 15, 16, 2, group, 64, torch.bfloat16, "vllm", gen, device)
    want = tree_attention_reference(query, keys, values, meta, scale=0.125)
    one = tree_attention(query, keys, values, meta, scale=0.125, num_splits=1)
    got = tree_attention(query, keys, values, meta, scale=0.125, num_splits=num_splits, block_n=32)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), one.float(), atol=2e-2, rtol=2e-2)


def test_split_k_chooser_and_bad_split_count(device):
    from vllm_ddtree.tree_attention import SPLIT_CHOICES, choose_num_splits

    # Always a precompiled count; more splits for fewer programs; none for short caches or full grids.
    picks = {(p, k): choose_num_splits(p, k, sms=132) for p in (1, 8, 33, 100, 264, 5000)
             for k in (128, 1024, 4096, 32768)}
    assert set(picks.values()) <= set(SPLIT_CHOICES)
    assert picks[(1, 32768)] == 16 and picks[(33, 32768)] == 8 and picks[(264, 32768)] == 1
    assert picks[(1, 128)] == 1 and picks[(5000, 4096)] == 1 and picks[(1, 1024)] == 4
    gen = torch.Generator().manual_seed(0)
    query, keys, values, meta = make_batch(MIXED[:2], 15, 16, 2, 4, 64, torch.bfloat16, "vllm", gen, device)
    with pytest.raises(ValueError, match="num_splits 0"):
        tree_attention(query, keys, values, meta, scale=0.125, num_splits=0)


def test_benchmark_script_runs_split_k_configs():
    # benchmarks/bench_tree_attention.py --smoke: the interpreter, one tiny case, two launch settings.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_tree_attention.py"), "--smoke",
                          "--configs", "32/-/-/-/1", "32/-/-/-/3"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.split()[:3] == ["2", "64", "17"]]
    assert len(rows) == 1 and len(rows[0]) == 9, run.stdout


def test_warm_up_launches_every_split_count(device):
    # Engine start on a GPU compiles each split variant; under the interpreter it must at least run
    # them all on the cache views of a live step's geometry (and leave the cache unchanged).
    from vllm_ddtree.tree_attention import SPLIT_CHOICES, warm_up_tree_attention

    gen = torch.Generator().manual_seed(3)
    _, keys, values, _, cache = make_batch(MIXED[:2], 15, 16, 2, 4, 64, torch.bfloat16, "vllm", gen, device,
                                           with_cache=True)
    before = cache.clone()
    assert warm_up_tree_attention(keys, values, 8, 64, 0.125, budget=15, dtype=torch.bfloat16) == SPLIT_CHOICES
    assert torch.equal(cache, before)


@pytest.mark.parametrize("head_dim,H", [(64, 3), (80, 3), (64, 40)])
def test_split_merge_kernel_matches_torch(head_dim, H, device):
    # The merge: out = sum_s softmax_s(lse) * partial_s per (row, head); a row whose splits are all
    # empty (-inf) stays 0; the output may be a strided view, as vLLM's is. 40 heads take two
    # programs a row (32 heads each at these sizes), the second one part-masked.
    from vllm_ddtree.tree_attention import merge_splits

    gen = torch.Generator().manual_seed(head_dim + H)
    S, T = 4, 6
    partial = torch.randn(S, T, H, head_dim, generator=gen)
    lse = torch.randn(S, T, H, generator=gen) * 3
    lse[1:, 2] = float("-inf")  # row 2: one split saw keys
    lse[:, 4] = float("-inf")   # row 4: none did
    weight = torch.softmax(lse, 0).nan_to_num(0.0)  # row 4: softmax of all -inf is NaN, weighs nothing
    want = (weight.unsqueeze(-1) * partial).sum(0)
    assert torch.equal(want[2], partial[0, 2]) and not want[4].any()
    buffer = torch.full((T, H * head_dim + 8), float("nan"), device=device)
    out = buffer[:, : H * head_dim].view(T, H, head_dim)
    merge_splits(partial.to(device), lse.to(device), out)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)
    assert buffer[:, H * head_dim:].isnan().all()


def test_cpu_kernel_without_a_compiler_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    # A machine without a working C++ compiler: the build fails, one warning names the fix, and
    # cpu_kernel() is None (the backend then takes the dense path); VLLM_DDTREE_CPU_KERNEL=0 skips it.
    import functools

    from vllm_ddtree import tree_attention as ta

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a fresh build, not the cached one
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    # A fresh cache for this test only: the process keeps its built kernel for the tests after it.
    monkeypatch.setattr(ta, "_built_cpu_kernel", functools.cache(ta._built_cpu_kernel.__wrapped__))
    with caplog.at_level("WARNING"):
        assert ta.cpu_kernel() is None
    assert "could not be built" in caplog.text and "install a C++ compiler" in caplog.text
    monkeypatch.setenv("VLLM_DDTREE_CPU_KERNEL", "0")
    assert ta.cpu_kernel() is None
