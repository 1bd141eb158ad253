"""The cost model of the cost-aware budget (:mod:`vllm_ddtree.budget`), for one engine.

C_step(rows): a target step over that many query rows (vLLM's dummy forward, with attention metadata
on the GPU backends, plus the LM head over every row: a verify step needs logits for all of them; on
vLLM's CPU backend the V1 runner's dummy attention crashes the kernel, so there the attention is left
out), plus what each verified row costs beyond the target's forward: the verifier (its row sampled at
T = 1, and the walk) and, on the CPU backend, the tree attention a tree step runs in every target
layer instead of vLLM's kernel, with its plan (each backend's ``DUMMY_RUN_ATTENTION`` and
``extra_tree_attention``, :mod:`vllm_ddtree.adapter.attention`), timed on a few requests' full trees
and charged per row (so a tree of few nodes is not charged the verification of B).
C_draft(requests): the drafter's pass for that many requests (its dummy forward over D + 1 query rows
each, its LM head over D rows each, and the tree build). The KV commit (a few copies per layer, only
where a path moves) is left out.
Both are timed at engine start on the engine's own device (the fastest of 3 after a warm-up, since
whatever else runs on the machine only adds time to a pass; one when a pass
takes over 0.25 s, at powers of two up to what one step can hold), fitted monotone convex, logged in
one line, and kept on disk (``~/.cache/vllm-ddtree/step-costs``) under a key of everything they depend
on (models, dtype, device, parallel sizes, budget, scheduler limits, vLLM version) so that a restart
does not pay them again. A user's table (``"ddtree_step_costs"``: a JSON file or a dict ``{"step":
{rows: seconds}, "draft": {requests: seconds}}``) replaces the measurement. With tensor parallelism
every rank uses rank 0's tables, so that every rank keeps the same nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from vllm_ddtree.adapter import cuda_only
from vllm_ddtree.adapter.options import read_table
from vllm_ddtree.budget import StepCosts
from vllm_ddtree.tree import build_tree
from vllm_ddtree.tree_attention import CPU_KERNEL_ENV
from vllm_ddtree.verify import TreeSampling, verify_tree

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "vllm-ddtree", "step-costs")
# Part of the disk cache's key: raised whenever what the tables time changes, so that tables timed
# by an earlier release are measured again (2: the verifier and the tree attention, per row, in C_step;
# 3: the fastest of the timed passes, not their median).
COST_MODEL_REVISION = 3


def step_costs(runner, state, log) -> StepCosts:
    """The engine's :class:`StepCosts` on its device: the user's table, the disk cache, or measured."""
    max_rows, max_requests = table_sizes(runner, state)
    user = state.options.step_costs
    key = _cache_key(runner, state, max_rows)
    path = os.path.join(CACHE_DIR, key + ".json")
    # Timing runs the model, so with tensor parallelism every rank times or none does: rank 0's cache
    # decides (another rank's disk may differ, or see rank 0's file appear midway).
    cached = _rank0_decides(user is None and os.path.isfile(path))
    if user is not None:
        samples, source = read_table(user), "from ddtree_step_costs"
    elif cached and _tp_rank() == 0:
        with open(path) as f:
            samples, source = read_table(json.load(f)), f"cached in {path}"
    elif cached:  # a placeholder of the tables' shapes: rank 0's cached tables are broadcast below
        samples, source = ({1: 0.0, 2: 0.0}, {1: 0.0, 2: 0.0}), "from rank 0"
    else:
        start = time.perf_counter()
        samples = measure(runner, state, max_rows, max_requests)
        source = f"measured in {time.perf_counter() - start:.1f} s"
        if _tp_rank() == 0:
            os.makedirs(CACHE_DIR, exist_ok=True)
            partial = f"{path}.{os.getpid()}.tmp"  # engines side by side (data parallelism) share the path
            with open(partial, "w") as f:
                json.dump({"step": samples[0], "draft": samples[1], "key": _key_fields(runner, state, max_rows)}, f)
            os.replace(partial, path)
    costs = _same_on_every_rank(StepCosts.from_samples(*samples, max_rows, max_requests, runner.device))
    s, d = costs.step, costs.draft
    log.info("ddtree: cost-aware budget, step costs %s: target step %.2f ms at 1 row, %.2f ms at %d rows; "
             "drafter %.2f ms at 1 request, %.2f ms at %d", source, 1e3 * s[1], 1e3 * s[-1], max_rows,
             1e3 * d[1], 1e3 * d[-1], max_requests)
    return costs


def table_sizes(runner, state) -> tuple[int, int]:
    """The most rows one step can hold and the most requests: the cost tables' sizes."""
    scheduler = runner.scheduler_config
    return (min(scheduler.max_num_batched_tokens, scheduler.max_num_seqs * (state.options.budget + 1)),
            scheduler.max_num_seqs)


def measure(runner, state, max_rows: int, max_requests: int) -> tuple[dict[int, float], dict[int, float]]:
    """Timed dummy passes: ``({rows: seconds}, {requests: seconds})``, on either model runner."""
    backend = state.target.backend
    target_step, drafter_pass = (_v2_passes if hasattr(runner, "speculator") else _v1_passes)(runner, state)
    verify_pass = _verify_pass(runner, state)

    def verified_rows(requests):
        backend.extra_tree_attention(state, requests)
        verify_pass(requests)

    timed = min(max_requests, VERIFY_TIMED_REQUESTS)
    per_row = _fastest_seconds(verified_rows, timed, runner.device) / (timed * (state.options.budget + 1))
    step = {rows: _fastest_seconds(target_step, rows, runner.device) + per_row * rows for rows in _grid(max_rows)}
    draft = {r: _fastest_seconds(drafter_pass, r, runner.device) for r in _grid(max_requests)}
    return step, draft


def _v1_passes(runner, state):
    """The V1 runner's dummy target step over ``rows`` (with its LM head over every row) and its
    drafter's dummy pass for ``requests`` (D + 1 query rows each, the LM head over D, the tree build)."""
    drafter = runner.drafter
    vocab = runner.model_config.get_vocab_size()
    backend = state.target.backend
    depth = state.options.depth

    def target_step(rows):
        hidden, _ = runner._dummy_run(rows, force_attention=backend.DUMMY_RUN_ATTENTION)
        runner.model.compute_logits(hidden[:rows])

    def drafter_pass(requests):
        drafter.dummy_run(requests * (depth + 1))
        logits = drafter.model.compute_logits(drafter.hidden_states[: requests * depth])
        build_tree(logits.view(requests, depth, -1)[..., :vocab], state.options.budget,
                   builder=backend.TREE_BUILDER)

    return target_step, drafter_pass


def _v2_passes(runner, state):
    """V2's dummy step runs the target and then the speculator's pass (DFlash's query forward, the
    LM head over D rows a request, the tree build: :class:`~vllm_ddtree.adapter.v2_drafter.DDTreeSpeculator`),
    which times them apart: the target step with every pass skipped, and the pass alone, called
    again with the arguments it had in a dummy step of ``requests`` one-token requests."""
    speculator = runner.speculator
    passes = {}

    def target_step(rows):
        with speculator.timing("skip"):
            hidden, _ = runner._dummy_run(rows)
        runner.model.compute_logits(hidden[:rows])

    def drafter_pass(requests):
        if requests not in passes:  # the first (warm-up) call of each size
            with speculator.timing("record"):
                runner._dummy_run(requests)
            passes[requests] = speculator.recorded_pass
        args, kwargs = passes[requests]
        speculator.propose(*args, **kwargs)

    return target_step, drafter_pass


# The per-row costs are timed on this many requests' full trees (random logits of every node's row):
# a full batch's logits would take gigabytes at engine start.
VERIFY_TIMED_REQUESTS = 4


def _verify_pass(runner, state):
    """The verifier on ``requests`` trees of B nodes (random logits, T = 1): what a tree step adds
    after the target's forward, beyond the one row a request that plain decoding samples."""
    vocab = runner.model_config.get_vocab_size()
    budget, depth, dev = state.options.budget, state.options.depth, runner.device
    dtype, builder = runner.model_config.dtype, state.target.backend.TREE_BUILDER
    inputs = {}

    def verify_pass(requests):
        if requests not in inputs:
            tree = build_tree(torch.randn(requests, depth, vocab, dtype=dtype, device=dev), budget, builder=builder)
            logits = torch.randn(requests * (budget + 1), vocab, dtype=dtype, device=dev)
            inputs[requests] = tree, logits, TreeSampling.uniform(requests, temperature=1.0, device=dev)
        tree, logits, sampling = inputs[requests]
        verify_tree(tree, logits, sampling, torch.zeros(requests, dtype=torch.int64, device=dev),
                    row_starts=torch.arange(requests, device=dev) * (budget + 1))

    return verify_pass


def _grid(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit``, and ``limit`` itself (at least two points)."""
    points = {1, max(2, limit)}
    p = 2
    while p < limit:
        points.add(p)
        p *= 2
    return sorted(points)


@torch.inference_mode()
def _fastest_seconds(fn, size: int, device) -> float:
    def sync():
        cuda_only.synchronize(device)

    sync()
    start = time.perf_counter()
    fn(size)  # warm-up (compilation, allocator)
    sync()
    # Long passes vary little: spare the start. Every rank runs as many passes as rank 0 (collectives).
    repeats = 3 if _rank0_decides(time.perf_counter() - start < 0.25) else 1
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(size)
        sync()
        samples.append(time.perf_counter() - start)
    return min(samples)


def _tp_rank() -> int:
    from vllm.distributed import get_tp_group

    return get_tp_group().rank_in_group


def _rank0_decides(flag: bool) -> bool:
    """Tensor-parallel rank 0's ``flag`` on every rank (the flag itself on one rank)."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    return flag if group.world_size == 1 else bool(group.broadcast_object(flag, src=0))


def _same_on_every_rank(costs: StepCosts) -> StepCosts:
    """Rank 0's tables on every tensor-parallel rank (each measured its own: close, not equal)."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size > 1:
        table = torch.cat([costs.step, costs.draft]).to(group.device)
        group.broadcast(table, src=0)
        table = table.to(costs.step.device)
        costs = StepCosts(table[: costs.step.shape[0]], table[costs.step.shape[0]:])
    return costs


def _key_fields(runner, state, max_rows: int) -> dict:
    import vllm

    device = runner.device
    name = cuda_only.device_name(device)
    parallel = runner.parallel_config
    return {"target": runner.model_config.model, "drafter": runner.speculative_config.draft_model_config.model,
            "dtype": str(runner.model_config.dtype), "device": name, "tp": parallel.tensor_parallel_size,
            "pp": parallel.pipeline_parallel_size, "budget": state.options.budget, "depth": state.options.depth,
            "max_rows": max_rows, "max_num_seqs": runner.scheduler_config.max_num_seqs,
            "vllm": vllm.__version__, "preload": os.environ.get("LD_PRELOAD", ""),
            "cpu_kernel": os.environ.get(CPU_KERNEL_ENV, "1"), "revision": COST_MODEL_REVISION}


def _cache_key(runner, state, max_rows: int) -> str:
    fields = json.dumps(_key_fields(runner, state, max_rows), sort_keys=True)
    return hashlib.sha256(fields.encode()).hexdigest()[:24]
