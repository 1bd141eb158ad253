"""The round's device functions read nothing back to the host (issue 14): on a GPU each such read
stalls the stream, and none can run inside a CUDA graph. Checked on CPU by instrumenting the ways a
value reaches the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, a tensor's truth or
int/float value) and the pageable uploads of host data (``torch.tensor`` / ``torch.as_tensor`` of
Python values; vLLM's pinned, non-blocking ``async_tensor_h2d`` is the allowed way down), while a
whole round runs: tree build, the cost-aware cut, its calibration, verification (greedy and
sampled), the tree positions, and the commit plans of the KV cache and the drafter's rows.
"""

import pytest
import torch
from host_sync_guard import HostSync, no_host_sync

from vllm_ddtree.adapter.state import DraftedTrees, StepTrees
from vllm_ddtree.adapter.step_layout import write_tree_positions
from vllm_ddtree.budget import AcceptanceCalibration, StepCosts, kept_nodes
from vllm_ddtree.kv_commit import commit_accepted_rows, plan_commit
from vllm_ddtree.tree import build_tree
from vllm_ddtree.verify import TreeSampling, verify_tree


def test_the_guard_catches_each_kind_of_host_read():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: x.cpu(), lambda: bool(x[0]),
                 lambda: int(x[0]), lambda: torch.tensor([1, 2]), lambda: torch.as_tensor(2.0)):
        with no_host_sync(), pytest.raises(HostSync):
            read()
    assert x.sum().item() == 3.0  # restored after the block


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_round_reads_nothing_back(temperature, device):
    R, D, V, B, page = 4, 7, 50, 16, 16
    gen = torch.Generator().manual_seed(0)
    draft_logits = (torch.randn(R, D, V, generator=gen) * 3).to(device)
    costs = StepCosts.from_samples({1: 0.01, 4096: 0.02}, {1: 0.001, 256: 0.002}, 512, 8, device)
    calibration = AcceptanceCalibration(torch.device(device))
    logits = torch.randn(R * (B + 1), V, generator=gen).to(device)
    row_starts = torch.arange(R, device=device) * (B + 1)
    root_positions = torch.tensor([5, 40, 17, 63], device=device)
    block_table = torch.randperm(64, generator=gen)[:32].view(R, 8).to(device, torch.int32)
    sampling = TreeSampling.uniform(R, temperature=temperature, top_k=20, top_p=0.9, device=device)
    hidden = torch.randn(R * (B + 1), 8, generator=gen).to(device)
    positions = torch.arange(R * (B + 1), device=device)
    build_tree(draft_logits, B)  # first call per shape builds its index grid (cached, outside any step)

    with no_host_sync():
        tree = build_tree(draft_logits, B)
        tree = tree.cut(kept_nodes(tree.scores, costs, calibration=calibration.value))
        verdict = verify_tree(tree, logits, sampling, root_positions, row_starts=row_starts)
        calibration.update(tree.scores, verdict.num_accepted)
        step = StepTrees(tree, tree.num_nodes, row_starts, root_positions, attention=None)
        write_tree_positions(positions, step, tree.depths)
        plan_commit(block_table, page, root_positions, verdict.accepted_nodes)
        commit_accepted_rows(hidden, row_starts, verdict.accepted_nodes)
    assert verdict.output_tokens.shape == (R, D + 1) and bool((verdict.num_accepted <= D).all().cpu())


def test_trees_follow_their_requests_into_the_next_batch_without_a_host_read(device):
    # The trees drafted in one step's batch order, verified in the next step's: the same rows (a steady
    # batch), or rows that vLLM moved, removed (its tree is dropped) and added (no tree yet).
    from vllm_ddtree.adapter.step_layout import trees_of_batch

    B, D = 8, 4
    trees = build_tree((torch.randn(3, D, 20, generator=torch.Generator().manual_seed(0)) * 3).to(device), B)
    drafted = DraftedTrees(trees, ["a", "b", "c"])
    kept, kept_moved = torch.tensor([8, 2, 0], device=device), torch.tensor([8, 0, 3], device=device)
    with no_host_sync():
        steady = trees_of_batch(drafted, ["a", "b", "c"], kept, B, D)
        moved = trees_of_batch(drafted, ["c", "new", "a"], kept_moved, B, D)
    assert steady.num_nodes.tolist() == [8, 2, 0]
    assert torch.equal(steady.token_ids[0], trees.token_ids[0]) and torch.equal(steady.parents, trees.parents.where(
        torch.arange(B, device=device) < steady.num_nodes.unsqueeze(1), 0))
    assert moved.num_nodes.tolist() == [8, 0, 3]
    assert torch.equal(moved.token_ids[0], trees.token_ids[2])
    assert (moved.token_ids[1] == -1).all()
    assert torch.equal(moved.token_ids[2, :3], trees.token_ids[0, :3]) and (moved.token_ids[2, 3:] == -1).all()
    assert torch.equal(moved.ancestor_bits[2], trees.ancestor_bits[0])
