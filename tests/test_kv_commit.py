"""commit_accepted_kv: the accepted path's KV lands in the first slots after the prefix, in every layout."""

import pytest
import torch

from vllm_ddtree.kv_commit import (commit_accepted_kv, commit_accepted_kv_reference, commit_accepted_rows,
                                   commit_accepted_tokens, paged_kv_views, plan_commit)
from vllm_ddtree.tree import build_tree


def _cache(layout, blocks, block_size, heads, head_dim, dtype, gen):
    if layout == "flash_attn":
        return torch.randn(2, blocks, block_size, heads, head_dim, generator=gen).to(dtype)
    if layout == "vllm":  # vLLM's GPU backends get a strided per-layer view: physically [B, N, H, C]
        return torch.randn(blocks, block_size, heads, 2 * head_dim, generator=gen).to(dtype).transpose(1, 2)
    return torch.randn(blocks, heads, block_size, 2 * head_dim, generator=gen).to(dtype)


@pytest.mark.parametrize("layout,dtype", [("flash_attn", torch.float32), ("vllm", torch.float16), ("cpu", torch.float32),
                                          ("cpu_amx", torch.bfloat16)])
def test_commit_by_flat_indices_equals_the_view_reference(layout, dtype):
    # The CPU path moves every layer's tokens by flat indices computed once for the geometry; it
    # must move exactly what the per-view reference moves, in every layout.
    gen = torch.Generator().manual_seed(8)
    R, depth, budget, block_size = 5, 5, 24, 32
    block_table = torch.randperm(R * 4, generator=gen).view(R, 4)
    plan = plan_commit(block_table, block_size, torch.randint(0, 100, (R,), generator=gen),
                       _random_paths(gen, R, depth, budget))
    layers = [_cache(layout, R * 4, block_size, 2, 64, dtype, gen) for _ in range(3)]
    original, want = layers[0].clone(), [c.clone() for c in layers]
    for cache in want:
        for view in paged_kv_views(cache, layout):
            commit_accepted_kv_reference(view, plan)
    commit_accepted_tokens(layers, layout, plan)
    for got, expected in zip(layers, want):
        assert torch.equal(got, expected)
    assert plan.moves.any() and not torch.equal(layers[0], original)


def _random_paths(gen, R, depth, budget):
    """Trees from random drafts, and for each a random accepted path (a node and its ancestors)."""
    tree = build_tree(torch.randn(R, depth, 5, generator=gen) * 2, budget)
    nodes = torch.full((R, depth + 1), -1, dtype=torch.long)
    nodes[:, 0] = 0
    for r in range(R):
        n = int(tree.num_nodes[r])
        end = int(torch.randint(0, n + 1, (1,), generator=gen))
        chain = []
        while end:
            chain.append(end)
            end = int(tree.parents[r, end - 1])
        nodes[r, 1:len(chain) + 1] = torch.tensor(chain[::-1], dtype=torch.long)
    nodes[0, 1:] = torch.cat([torch.arange(1, 3), torch.full((depth - 2,), -1)])  # contiguous path
    return nodes


@pytest.mark.parametrize("layout", ["flash_attn", "vllm", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16, 32])
def test_commit_matches_naive_and_kernel(layout, dtype, block_size, device):
    gen = torch.Generator().manual_seed(block_size)
    R, depth, budget, heads, head_dim = 6, 5, 24, 2, 8
    blocks_per_req = (200 + budget) // block_size + 2
    block_table = torch.randperm(R * blocks_per_req, generator=gen).view(R, blocks_per_req)
    roots = torch.randint(0, 200, (R,), generator=gen)
    accepted = _random_paths(gen, R, depth, budget)
    layers = [_cache(layout, R * blocks_per_req, block_size, heads, head_dim, dtype, gen) for _ in range(2)]

    # Naive expectation, token by token, on plain [token, ...] copies of each request's keys and values.
    expected = []
    for cache in layers:
        views = [v.clone() for v in paged_kv_views(cache, layout)]
        for view in views:
            before = [[view[block_table[r, (int(roots[r]) + i) // block_size], (int(roots[r]) + i) % block_size].clone()
                       for i in range(budget + 1)] for r in range(R)]
            for r in range(R):
                for j, node in enumerate(accepted[r].tolist()):
                    if node >= 0:
                        pos = int(roots[r]) + j
                        view[block_table[r, pos // block_size], pos % block_size] = before[r][node]
        expected.append(views)

    plan = plan_commit(block_table.to(device), block_size, roots.to(device), accepted.to(device))
    assert not plan.moves[0].any()  # a contiguous path moves nothing
    for use_triton in (False, True):
        caches = [c.clone().to(device) for c in layers]
        commit_accepted_kv([v for c in caches for v in paged_kv_views(c, layout)], plan, use_triton=use_triton)
        for got, want in zip(caches, expected):
            for got_view, want_view in zip(paged_kv_views(got, layout), want):
                assert torch.equal(got_view.cpu(), want_view), f"use_triton={use_triton}"


def _written_by_vllm_cpu(isa, blocks, heads, block_size, head_dim, dtype, gen):
    """A cache filled by vLLM's CPU cache op in ``isa``'s layout; (cache, slots, keys, values)."""
    from vllm import _custom_ops as ops

    T = blocks * block_size - 5
    cache = torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    keys = torch.randn(T, heads, head_dim, generator=gen).to(dtype)
    values = torch.randn(T, heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[:T]
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa, 1.0, 1.0, "auto")
    return cache, slots, keys, values


# vLLM's CPU build writes the "amx" layout with AMX tile instructions: only a CPU that has them (Intel
# Sapphire Rapids and later) can produce the bytes these tests compare against; elsewhere vLLM never
# picks that ISA, so no engine there reads the layout.
NEEDS_AMX = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                               reason="vLLM's AMX cache writer needs a CPU with AMX tiles")


@pytest.mark.parametrize("isa,layout,block_size,head_dim,dtype", [
    ("vec", "cpu", 32, 64, torch.float32), ("vec16", "cpu", 16, 32, torch.float32), ("vec", "cpu", 64, 32, torch.float32),
    pytest.param("amx", "cpu_amx", 32, 64, torch.bfloat16, marks=NEEDS_AMX),
    pytest.param("amx", "cpu_amx", 64, 128, torch.bfloat16, marks=NEEDS_AMX),
    pytest.param("amx", "cpu_amx", 128, 64, torch.bfloat16, marks=NEEDS_AMX)])
def test_cpu_layouts_are_what_vllm_cpu_writes(isa, layout, block_size, head_dim, dtype):
    # The "cpu" and "cpu_amx" views must read back exactly what vLLM's CPU backend stores in each ISA,
    # and tokens written through them must land in the bytes vLLM's op writes.
    gen = torch.Generator().manual_seed(block_size + head_dim)
    cache, slots, keys, values = _written_by_vllm_cpu(isa, 3, 2, block_size, head_dim, dtype, gen)
    key_view, value_view = paged_kv_views(cache, layout)
    where = (slots // block_size, slots % block_size)
    assert torch.equal(key_view[where], keys) and torch.equal(value_view[where], values)
    rewritten = torch.full_like(cache, float("nan"))
    key_view, value_view = paged_kv_views(rewritten, layout)
    key_view[where], value_view[where] = keys, values
    written = ~rewritten.isnan()
    assert torch.equal(rewritten[written], cache[written]) and written.sum() == 2 * keys.numel()


@NEEDS_AMX
def test_commit_on_the_amx_layout_moves_what_it_moves_on_the_vec_layout():
    # The same tokens in vLLM's "amx" and "vec" layouts; one commit plan; the same tokens afterwards.
    gen = torch.Generator().manual_seed(3)
    R, depth, budget, block_size = 4, 5, 24, 32
    amx, slots, keys, values = _written_by_vllm_cpu("amx", 8, 2, block_size, 64, torch.bfloat16, gen)
    vec, _, _, _ = _written_by_vllm_cpu("vec", 8, 2, block_size, 64, torch.bfloat16, torch.Generator().manual_seed(3))
    block_table = torch.randperm(8, generator=gen)[: R * 2].view(R, 2)
    plan = plan_commit(block_table, block_size, torch.tensor([3, 10, 0, 30]), _random_paths(gen, R, depth, budget))
    assert plan.moves.any()
    for cache, layout in ((amx, "cpu_amx"), (vec, "cpu")):
        commit_accepted_kv(list(paged_kv_views(cache, layout)), plan)
    everywhere = (torch.arange(8).repeat_interleave(block_size), torch.arange(block_size).repeat(8))
    for a, v in zip(paged_kv_views(amx, "cpu_amx"), paged_kv_views(vec, "cpu")):
        assert torch.equal(a[everywhere], v[everywhere])


def test_overlapping_path_reads_before_writes(device):
    # Path 0 -> 2 -> 5 -> 6: node 2 moves to slot 1 while node 5 moves into slot 2 and 6 into 3.
    cache = torch.arange(2 * 8 * 4 * 1 * 2, dtype=torch.float32).view(2, 8, 4, 1, 2)
    accepted = torch.tensor([[0, 2, 5, 6]])
    plan = plan_commit(torch.tensor([[3, 1, 0, 2, 4, 5, 6, 7]], device=device), 4, torch.tensor([2], device=device),
                       accepted.to(device))
    for use_triton in (False, True):
        c = cache.clone().to(device)
        views = list(paged_kv_views(c, "flash_attn"))
        before = [[v[plan.src_block[0, j], plan.src_offset[0, j]].clone() for j in range(3)] for v in views]
        commit_accepted_kv(views, plan, use_triton=use_triton)
        for v, b in zip(views, before):
            for j in range(3):
                assert torch.equal(v[plan.dst_block[0, j], plan.dst_offset[0, j]], b[j])


def test_commit_rows_for_drafter_hidden_states():
    rows = torch.randn(40, 6)
    root_rows = torch.tensor([0, 13, 27])
    accepted = torch.tensor([[0, 3, 4, -1], [0, 1, 2, 3], [0, 2, 9, 11]])
    want = rows.clone()
    for r in range(3):
        for j, node in enumerate(accepted[r].tolist()):
            if node >= 0:
                want[root_rows[r] + j] = rows[root_rows[r] + node]
    commit_accepted_rows(rows, root_rows, accepted)
    assert torch.equal(rows, want)


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown KV cache layout 'nhd'"):
        paged_kv_views(torch.zeros(1), "nhd")


def test_reference_is_what_the_dispatcher_runs_on_cpu():
    cache = torch.randn(2, 4, 4, 1, 2)
    plan = plan_commit(torch.tensor([[0, 1, 2, 3]]), 4, torch.tensor([0]), torch.tensor([[0, 3, -1]]))
    a, b = cache.clone(), cache.clone()
    commit_accepted_kv(list(paged_kv_views(a, "flash_attn")), plan)
    for view in paged_kv_views(b, "flash_attn"):
        commit_accepted_kv_reference(view, plan)
    assert torch.equal(a, b) and not torch.equal(a, cache)
