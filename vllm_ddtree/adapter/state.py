"""A ddtree engine's own state, on its model runner: typed, field by field, and the only place where a
step's trees live between the hooks that make and read them (vLLM's objects carry none of it).

:class:`DDTreeState` is made with the runner (one per worker process) and holds:

* ``options``: the engine's :class:`~vllm_ddtree.adapter.options.DDTreeOptions`;
* ``target``: the target's attention layers and caches (:class:`TargetLayers`, set at engine start);
* ``costs`` / ``costs_host`` / ``calibration``: the cost-aware budget's step-cost tables (on the
  device and on the host) and its acceptance calibration (engine start; None for a fixed budget);
* ``schedule``: when the drafter drafts (:class:`DraftSchedule`);
* ``drafted``: the trees the last drafter pass made (:class:`DraftedTrees`), consumed by the next step;
* ``step``: the trees the step in flight verifies (:class:`StepTrees`), from its layout to its commit;
* ``pending_attention``: that step's tree metadata until the runner attaches it to the target layers'
  attention metadata, once (a dummy run of vLLM's later in the step gets none);
* ``structured_outputs``: whether the step's batch has structured-output requests.

The round through these fields: the drafter's pass (:mod:`~vllm_ddtree.adapter.drafter`) sets
``drafted``; the next step's layout (:mod:`~vllm_ddtree.adapter.step_layout`) turns it into ``step``;
the verifier (:mod:`~vllm_ddtree.adapter.verifier`) verifies and commits it and sets
``step.accepted_nodes``, which the drafter's next pass reads to commit its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vllm_ddtree.adapter.options import DDTreeOptions
from vllm_ddtree.budget import AcceptanceCalibration, StepCosts
from vllm_ddtree.tree import DraftTree
from vllm_ddtree.tree_attention import TreeAttentionMetadata


@dataclass
class DraftedTrees:
    """One drafter pass's trees, row r for request ``req_ids[r]`` of the batch that drafted them."""

    tree: DraftTree
    req_ids: list[str]


@dataclass
class StepTrees:
    """The trees verified in this step, one per request of the batch (empty for non-tree requests)."""

    tree: DraftTree
    num_draft: torch.Tensor       # [R] draft tokens the scheduler kept for each request (0 = no tree)
    root_rows: torch.Tensor       # [R] row of each request's root in the step's flattened tokens
    root_positions: torch.Tensor  # [R] the root's position (storage and RoPE)
    attention: TreeAttentionMetadata | None
    accepted_nodes: torch.Tensor | None = None  # [R, D+1] set by the verifier (root first, -1 after the path)


@dataclass
class TargetLayers:
    """The target's attention layers that tree steps hook (not the drafter's), in one KV cache group."""

    layers: dict[str, object]     # layer name -> vLLM attention layer
    kv_group: int                 # their KV cache group (its block table addresses their caches)
    kv_caches: list[torch.Tensor]  # their caches, each once (layers may share one)
    kv_layout: str                # a vllm_ddtree.kv_commit.LAYOUTS entry, the same for every layer
    backend: object               # the attention backend module (vllm_ddtree.adapter.attention)


# A cost-aware engine whose last full drafter pass kept no node for the whole batch runs the drafter
# without drafting (its context K/V only) until it probes again with a full pass, to see whether
# trees pay now (the batch and its contexts change): after 8 steps, and twice as long after each probe
# that again keeps nothing, up to 128 (a probe a few seconds apart in a steady batch: at 64, probes
# alone cost ~0.8% of plain decoding at 4 requests on the CPU), and never more often than
# ``affordable`` allows; a probe that keeps a node starts over at 8.
PROBE_INTERVAL, MAX_PROBE_INTERVAL = 8, 128


@dataclass
class DraftSchedule:
    """Whether the drafter drafts this step (a full pass) or only keeps its context, and when a
    cost-aware engine that stopped drafting probes again. Host values only: every rank decides alike."""

    skip: int = 0                       # steps left that keep the drafter's context without drafting
    interval: int = PROBE_INTERVAL      # steps until the next probe, after one that kept nothing
    full_pass_last_step: bool = False   # the last drafter pass drafted

    def next_pass_drafts(self) -> bool:
        """Whether the coming drafter pass is a full one (read before it; :meth:`drafts_now` starts it)."""
        return self.skip == 0

    def drafts_now(self) -> bool:
        """Called once per drafter pass: True for a full pass, False to keep the context only."""
        self.full_pass_last_step = self.next_pass_drafts()
        if not self.full_pass_last_step:
            self.skip -= 1
        return self.full_pass_last_step

    def after_schedule(self, nothing_drafted: bool, affordable: Callable[[], int]) -> None:
        """After the scheduler saw a full pass's drafts (``nothing_drafted``: it kept no node for any
        request); ``affordable()``: the fewest steps between probes that cost at most their share."""
        if not self.full_pass_last_step:
            return
        if nothing_drafted:
            self.skip = max(self.interval, affordable()) - 1
            self.interval = min(2 * self.interval, MAX_PROBE_INTERVAL)
        else:
            self.interval = PROBE_INTERVAL


@dataclass
class DDTreeState:
    """One runner's ddtree state (see the module docstring)."""

    options: DDTreeOptions
    target: TargetLayers | None = None
    costs: StepCosts | None = None
    costs_host: StepCosts | None = None
    calibration: AcceptanceCalibration | None = None
    schedule: DraftSchedule = field(default_factory=DraftSchedule)
    drafted: DraftedTrees | None = None
    step: StepTrees | None = None
    pending_attention: TreeAttentionMetadata | None = None
    structured_outputs: bool = False

    def take_drafted(self) -> DraftedTrees | None:
        """The last pass's trees, once: a step whose drafter did not run leaves none behind."""
        drafted, self.drafted = self.drafted, None
        return drafted
