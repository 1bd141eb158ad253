"""Round steps 3-5 in vLLM's V1 model runner, and the one place that hooks that runner.

``GPUModelRunner`` (``CPUModelRunner`` inherits it) gets one class-level hook, on ``__init__``. A runner
built for any other config runs vLLM's code untouched; a runner built for a ddtree config builds
:class:`~vllm_ddtree.adapter.proposer.DDTreeProposer` where DFlash's proposer would be, and is then
hooked per instance:

* ``rejection_sampler`` becomes :class:`TreeVerifier`: tree verification, then the KV commit of the
  accepted path (the target's caches only, each once);
* ``_prepare_inputs``: after vLLM laid the step out (sequential storage positions and slots), tree
  rows get their RoPE positions ``root + depth`` in the runner's positions buffer (the one the model
  reads and a CUDA graph captures), and the step's :class:`TreeAttentionMetadata` is made;
* ``_build_attention_metadata``: that tree metadata is attached to the target layers' attention
  metadata, where the attention hooks read it through vLLM's forward context, as vLLM's own
  backends read theirs; a step without trees carries none, so nothing leaks between steps or engines;
* ``initialize_kv_cache``: the target's attention layers are hooked and checked, and their caches
  noted for the commit. What the tree path cannot serve is refused here, at engine start. A
  cost-aware engine also gets its step costs here (:mod:`~vllm_ddtree.adapter.step_costs`);
* ``_get_draft_token_ids_cpu``: vLLM's own host conversion of the drafts hands the scheduler each
  request's nodes up to its first -1 (the nodes the budget did not keep);
* ``take_draft_token_ids``: in a batch with structured outputs the drafts go to the scheduler with
  their parents (:mod:`~vllm_ddtree.adapter.structured_outputs`).

:class:`DDTreeState` is the runner's own ddtree state: the trees the last step drafted (consumed by
the next step, so a step whose drafter did not run leaves none behind), the step in flight, and the
target's layers and caches. A V2-runner adapter would sit beside this module.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from vllm_ddtree.adapter import cpu_attention
from vllm_ddtree.adapter.attention_hook import TREE_METADATA, hook_target_layer
from vllm_ddtree.adapter.config import is_ddtree
from vllm_ddtree.adapter.logits_processing import node_processing
from vllm_ddtree.adapter.structured_outputs import with_parents
from vllm_ddtree.adapter.support import refusal
from vllm_ddtree.budget import AcceptanceCalibration, StepCosts
from vllm_ddtree.kv_commit import commit_accepted_kv, commit_accepted_tokens, paged_kv_views, plan_commit
from vllm_ddtree.node_logits import node_processor
from vllm_ddtree.tree import DraftTree, build_tree, empty_tree
from vllm_ddtree.tree_attention import TreeAttentionMetadata
from vllm_ddtree.verify import TreeSampling, row_layout, verify_tree


@dataclass
class StepTrees:
    """The trees verified in this step, one per request of the batch (empty for non-tree requests)."""

    tree: DraftTree
    num_draft: torch.Tensor       # [R] draft tokens the scheduler kept for each request (0 = no tree)
    root_rows: torch.Tensor       # [R] row of each request's root in the step's flattened tokens
    root_positions: torch.Tensor  # [R] the root's position (storage and RoPE)
    attention: TreeAttentionMetadata
    accepted_nodes: torch.Tensor | None = None


# A cost-aware engine whose last full drafter pass kept no node for the whole batch runs the drafter
# without drafting (its context K/V only) until it probes again with a full pass, to see whether
# trees pay now (the batch and its contexts change): after 8 steps, and twice as long after each probe
# that again keeps nothing, up to 64, and never more often than _affordable_probe_interval allows; a
# probe that keeps a node starts over at 8.
PROBE_INTERVAL, MAX_PROBE_INTERVAL = 8, 64


class DDTreeState:
    """One runner's ddtree state (see the module docstring)."""

    def __init__(self, budget: int, depth: int, policy: str = "fixed"):
        self.budget, self.depth, self.policy = budget, depth, policy
        self.costs: StepCosts | None = None  # the cost-aware policy's tables (engine start)
        self.costs_host: StepCosts | None = None  # the same on the host, for host-side decisions
        self.calibration: AcceptanceCalibration | None = None
        self.full_draft_last_step = False
        self.skip_drafting = 0  # steps left that keep the drafter's context without drafting
        self.probe_interval = PROBE_INTERVAL
        self.reserved = False  # the profiling run's tree step (GPU) ran
        self.drafted: tuple[DraftTree, list[str]] | None = None
        self.structured_outputs = False  # the step's batch has structured-output requests
        self.step: StepTrees | None = None
        self.pending_attention: TreeAttentionMetadata | None = None
        self.target_layers: dict[str, object] = {}
        self.kv_group = 0
        self.kv_caches: list[torch.Tensor] = []  # the target's caches, each once
        self.kv_layout = "vllm"

    def remember_trees(self, tree: DraftTree, req_ids) -> None:
        self.drafted = (tree, list(req_ids))

    def take_trees(self) -> tuple[DraftTree, list[str]] | None:
        drafted, self.drafted = self.drafted, None
        return drafted


def install(runner_cls) -> None:
    """The class-level hook on ``runner_cls.__init__`` (idempotent)."""
    if getattr(runner_cls.__init__, "_ddtree_hook", False):
        return
    original_init = runner_cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        spec = vllm_config.speculative_config
        if not is_ddtree(spec):
            return original_init(self, *args, **kwargs)
        self._ddtree = DDTreeState(spec.ddtree_max_budget, spec.ddtree_depth, spec.ddtree_policy)
        with _ddtree_proposer():
            original_init(self, *args, **kwargs)
        _hook_instance(self, self._ddtree)

    __init__._ddtree_hook = True
    runner_cls.__init__ = __init__


@contextlib.contextmanager
def _ddtree_proposer():
    """The runner builds its drafter by the name ``DFlashProposer`` in its module; while a ddtree
    runner is built that name is our subclass (``isinstance`` checks against DFlash still hold)."""
    from vllm.v1.worker import gpu_model_runner as module

    from vllm_ddtree.adapter.proposer import DDTreeProposer

    original = module.DFlashProposer
    module.DFlashProposer = DDTreeProposer
    try:
        yield
    finally:
        module.DFlashProposer = original


def _hook_instance(runner, state: DDTreeState) -> None:
    if runner.device.type == "cpu" and torch.cpu._is_amx_tile_supported():
        # vLLM 0.32's CPU build runs its AMX attention kernel ("amx" ISA, bf16) without asking the OS
        # for AMX permission; in a process where nothing else asked first it dies of SIGILL (seen with
        # head_dim 32, in vLLM's own engines too). ddtree engines keep that ISA, so they ask.
        torch.cpu._init_amx()
    runner.rejection_sampler = TreeVerifier(runner, state, runner.rejection_sampler)
    prepare, build, init_kv = runner._prepare_inputs, runner._build_attention_metadata, runner.initialize_kv_cache
    draft_lists, take_drafts = runner._get_draft_token_ids_cpu, runner.take_draft_token_ids

    def _prepare_inputs(*args, **kwargs):
        out = prepare(*args, **kwargs)
        scheduler_output = kwargs["scheduler_output"] if "scheduler_output" in kwargs else args[0]
        state.structured_outputs = scheduler_output.has_structured_output_requests
        prepare_tree_step(runner, state, out[1])
        return out

    def _build_attention_metadata(*args, **kwargs):
        attn_metadata, common = build(*args, **kwargs)
        attention, state.pending_attention = state.pending_attention, None
        if attention is not None:
            for name in state.target_layers:
                setattr(attn_metadata[name], TREE_METADATA, attention)
        return attn_metadata, common

    def initialize_kv_cache(*args, **kwargs):
        init_kv(*args, **kwargs)
        attach_target_layers(runner, state)
        if state.policy == "cost-aware":
            from vllm.logger import init_logger

            from vllm_ddtree.adapter.step_costs import step_costs

            state.costs = step_costs(runner, state, init_logger("vllm.ddtree"))
            state.costs_host = state.costs.to("cpu")
            state.calibration = AcceptanceCalibration(runner.device)

    def _get_draft_token_ids_cpu(*args, **kwargs):
        # Nodes a request does not verify are -1 at the end of its row; the scheduler gets the rest.
        # This is vLLM's own per-request host conversion of the drafts (after its one sync).
        lists, req_ids = draft_lists(*args, **kwargs)
        return [ids[: ids.index(-1)] if -1 in ids else ids for ids in lists], req_ids

    def take_draft_token_ids(*args, **kwargs):
        # A batch with structured outputs: the scheduler builds their grammar rows per node, so the
        # drafts go with their parents (read after vLLM's own sync of the drafts, one copy).
        drafts = take_drafts(*args, **kwargs)
        if drafts is None or not state.structured_outputs or state.drafted is None:
            return drafts
        return with_parents(drafts, state.drafted[0].parents.tolist())

    runner._prepare_inputs = _prepare_inputs
    runner._build_attention_metadata = _build_attention_metadata
    runner.initialize_kv_cache = initialize_kv_cache
    runner._get_draft_token_ids_cpu = _get_draft_token_ids_cpu
    runner.take_draft_token_ids = take_draft_token_ids


def attach_target_layers(runner, state: DDTreeState) -> None:
    """Hooks every target attention layer for tree steps and notes the caches the commit moves.

    Raises at engine start for a target the tree path cannot serve: layers spread over several KV
    cache groups, or an attention backend or layer feature the tree kernel does not compute. On a GPU
    the step's Triton kernels are compiled here, before any request.
    """
    drafter_layers = getattr(runner.drafter, "_draft_attn_layer_names", None)
    if drafter_layers is None:
        raise RuntimeError("ddtree cannot tell the drafter's attention layers from the target's in this vLLM")
    group_of = {name: i for i, group in enumerate(runner.kv_cache_config.kv_cache_groups)
                for name in group.layer_names if name not in drafter_layers}
    if len(set(group_of.values())) != 1:
        raise ValueError(f'speculative_config method "ddtree" needs the target\'s attention layers in one KV cache '
                         f"group (one block table for the tree); this target has {len(set(group_of.values()))}")
    layers = runner.compilation_config.static_forward_context
    state.target_layers = {name: layers[name] for name in group_of}
    state.kv_group = next(iter(group_of.values()))
    caches, layouts = {}, set()
    for name, layer in state.target_layers.items():
        hook_target_layer(name, layer)
        layouts.add(cpu_attention.cache_layout(name, layer) if runner.device.type == "cpu" else "vllm")
        caches.setdefault(layer.kv_cache.data_ptr(), layer.kv_cache)  # layers sharing a cache: once
    geometries = {(c.shape, c.stride(), c.dtype) for c in caches.values()}
    if len(layouts) != 1 or len(geometries) != 1:
        raise refusal(f"target attention layers with different KV cache layouts or shapes ({sorted(layouts)}, "
                      f"{len(geometries)} shapes)")
    state.kv_caches, state.kv_layout = list(caches.values()), layouts.pop()
    # The tree build at the engine's shapes: on a GPU its Triton kernel compiles, on CPU the beams'
    # index grids (cached per shape) are made, so that no live step waits for either.
    vocab = runner.model_config.get_vocab_size()
    build_tree(torch.zeros(1, state.depth, min(state.budget, vocab), device=runner.device), state.budget)
    if runner.device.type == "cuda":
        from vllm_ddtree.adapter import gpu_attention

        gpu_attention.warm_up(next(iter(state.target_layers.values())), state.budget, state.depth,
                              runner.model_config.dtype)


def write_tree_positions(positions: torch.Tensor, step: StepTrees, offsets: torch.Tensor) -> None:
    """``positions[root_row + j] = root_position + offsets[:, j - 1]`` for each request's tree rows
    ``j = 1..num_draft`` (in place; other rows keep their values)."""
    B = offsets.shape[1]
    node = torch.arange(1, B + 1, device=positions.device)
    in_tree = node.unsqueeze(0) <= step.num_draft.unsqueeze(1)
    root_rows, roots = step.root_rows.unsqueeze(1), step.root_positions.unsqueeze(1)
    rows = torch.where(in_tree, root_rows + node, root_rows)
    values = torch.where(in_tree, roots + offsets, roots)  # non-tree slots rewrite the root's own value
    positions.scatter_(0, rows.flatten(), values.flatten())


def prepare_tree_step(runner, state: DDTreeState, spec_decode_metadata) -> None:
    """After vLLM's ``_prepare_inputs``: RoPE positions of tree rows, and the step's tree metadata."""
    drafted = state.take_trees()
    state.step = state.pending_attention = None
    nothing_drafted = spec_decode_metadata is None or not any(spec_decode_metadata.num_draft_tokens)
    if state.full_draft_last_step and state.policy == "cost-aware":
        # Whether the last full drafter pass kept a node for any request: the schedule, a host list
        # every rank gets alike, says so (no device value is read).
        if nothing_drafted:
            state.skip_drafting = max(state.probe_interval, _affordable_probe_interval(state, runner)) - 1
            state.probe_interval = min(2 * state.probe_interval, MAX_PROBE_INTERVAL)
        else:
            state.probe_interval = PROBE_INTERVAL
    if nothing_drafted:  # no tree to verify: vLLM's own attention and sampler serve the step
        return
    num_reqs = runner.input_batch.num_reqs
    dev = runner.positions.device
    cu_drafts = spec_decode_metadata.cu_num_draft_tokens.to(dev, torch.int64)
    num_draft = cu_drafts - torch.cat([cu_drafts.new_zeros(1), cu_drafts[:-1]])
    tree = _batch_trees(drafted, runner.input_batch.req_ids[:num_reqs], num_draft, state.budget, state.depth)
    query_start = runner.query_start_loc.gpu[: num_reqs + 1].to(torch.int64)
    root_rows = query_start[1:] - (num_draft + 1)
    positions = runner.positions
    attention = TreeAttentionMetadata(
        query_start_loc=query_start.to(torch.int32),
        seq_lens=runner.seq_lens[:num_reqs].to(torch.int32),
        block_table=runner.input_batch.block_table[state.kv_group].get_device_tensor(num_reqs).to(torch.int32),
        tree_bits=tree.ancestor_bits,
        tree_rows=torch.where(num_draft > 0, num_draft + 1, 0).to(torch.int32),
    )
    state.step = StepTrees(tree, num_draft, root_rows, positions[root_rows], attention)
    write_tree_positions(positions, state.step, tree.depths)
    state.pending_attention = attention


def _affordable_probe_interval(state: DDTreeState, runner, share: float = 0.02) -> int:
    """Steps between probes so that probing (a full drafter pass) costs at most ``share`` of plain
    decoding at this batch size: at large batches a drafter pass costs many plain steps. Host tables."""
    costs = state.costs_host
    requests = min(runner.input_batch.num_reqs, costs.draft.shape[0] - 1)
    plain = float(costs.step[min(requests, costs.step.shape[0] - 1)])
    return int(min(1024, float(costs.draft[requests]) / max(plain, 1e-9) / share))


def _batch_trees(drafted, req_ids, num_draft: torch.Tensor, budget: int, depth: int) -> DraftTree:
    """The drafted trees of ``req_ids`` in batch order, cut to the drafts the scheduler kept.

    The trees are in the rows of the batch that drafted them. In a steady batch the rows are the same
    (one list comparison, no upload); after vLLM added, removed or moved requests, each request's row
    is looked up by id on the host, as vLLM's own runner maps its previous step's rows
    (``_compute_prev_positions``), and goes down in one pinned non-blocking copy.
    """
    from vllm.utils.torch_utils import async_tensor_h2d

    R = len(req_ids)
    dev = num_draft.device
    if drafted is None:  # the drafter did not run last step: nothing to verify
        return empty_tree(R, budget, dev, depth)
    trees, tree_req_ids = drafted
    if list(req_ids) == tree_req_ids:
        return trees.cut(torch.minimum(trees.num_nodes, num_draft))
    index = {rid: i for i, rid in enumerate(tree_req_ids)}
    rows = async_tensor_h2d([index.get(rid, -1) for rid in req_ids], dev, torch.int64)
    mine = trees.take(rows.clamp(min=0))
    return mine.cut(torch.where(rows >= 0, torch.minimum(mine.num_nodes, num_draft), 0))


class TreeVerifier(torch.nn.Module):
    """Stands in for vLLM's ``RejectionSampler``: same call, same output format (-1 padded rows)."""

    def __init__(self, runner, state: DDTreeState, chain_sampler):
        super().__init__()
        self.runner = runner
        self.state = state
        self.chain_sampler = chain_sampler  # for vLLM's profiling dummy runs, which have no trees

    def forward(self, metadata, draft_probs, logits, sampling_metadata, *args, **kwargs):
        from vllm.v1.outputs import SamplerOutput

        step = self.state.step
        if step is None and metadata.max_spec_len == 0:
            # No request has a draft (a cost-aware engine decoding plainly): one logits row per request,
            # sampled as an engine without speculation samples it, without the rejection machinery.
            return self.chain_sampler.sampler(logits, sampling_metadata, predict_bonus_token=True)
        if step is None:  # vLLM's profiling and warm-up runs (dummy drafts, no trees)
            output = self.chain_sampler(metadata, draft_probs, logits, sampling_metadata, *args, **kwargs)
            if logits.is_cuda and not self.state.reserved:  # the first such call is vLLM's memory profile
                self.state.reserved = True
                self._reserve_tree_step_memory(logits)
            return output
        dev = logits.device
        num_draft = step.num_draft
        first = metadata.cu_num_sampled_tokens.to(dev, torch.int64) - (num_draft + 1)
        sampling = _tree_sampling(sampling_metadata, num_draft.shape[0], dev)
        processing = node_processing(sampling_metadata, num_draft.shape[0], logits.shape[-1], dev)
        verdict = verify_tree(step.tree, logits, sampling, step.root_positions, row_starts=first,
                              processing=processing)
        step.accepted_nodes = verdict.accepted_nodes
        if self.state.calibration is not None:
            self.state.calibration.update(step.tree.scores, verdict.num_accepted)
        self._commit_kv(step, verdict.accepted_nodes)
        logprobs = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs = self._logprobs(logits, first, step.tree, verdict, sampling_metadata, processing)
        return SamplerOutput(sampled_token_ids=verdict.output_tokens.to(torch.int32), logprobs_tensors=logprobs)

    def _logprobs(self, logits, first, tree, verdict, meta, processing):
        """Logprobs of each emitted token at the node the target sampled it from, in vLLM's layout:
        one row per output slot ``[R * (D+1)]``; slots past the path are dropped by vLLM's parser.
        The processed modes process the node's row as vLLM's sampler does (its logits processors
        with the node's path as history; unless the whole batch is greedy, then temperature and
        top-k/top-p, vLLM's own functions)."""
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

        sampler = self.chain_sampler.sampler
        slots = verdict.accepted_nodes.shape[1]
        node_rows = (first.unsqueeze(1) + verdict.accepted_nodes.clamp(min=0)).flatten()
        node_logits = logits[node_rows].to(torch.float32, copy=True)
        if sampler.logprobs_mode.startswith("processed"):
            if processing is not None:
                node_processor(processing, tree, *row_layout(first, logits.shape[0], tree.max_nodes))(
                    node_logits, node_rows)
            if not meta.all_greedy:
                request = torch.arange(first.shape[0], device=first.device).repeat_interleave(slots)
                sampler.apply_temperature(node_logits, meta.temperature[request], meta.all_random)
                node_logits = apply_top_k_top_p(node_logits, None if meta.top_k is None else meta.top_k[request],
                                                None if meta.top_p is None else meta.top_p[request])
        values = node_logits if sampler.logprobs_mode.endswith("logits") else sampler.compute_logprobs(node_logits)
        return sampler.gather_logprobs(values, meta.max_num_logprobs, verdict.output_tokens.flatten().clamp(min=0))

    def _commit_kv(self, step, accepted_nodes) -> None:
        caches, layout = self.state.kv_caches, self.state.kv_layout
        if not caches:
            return
        plan = plan_commit(step.attention.block_table, caches[0].shape[2], step.root_positions, accepted_nodes)
        if caches[0].is_cuda:  # the Triton kernel, one launch per view, no host read
            commit_accepted_kv([view for cache in caches for view in paged_kv_views(cache, layout)], plan)
        elif plan.moves.any():  # CPU: the host is the device, so reading it costs nothing; most paths
            commit_accepted_tokens(caches, layout, plan)  # are contiguous and move nothing

    def _reserve_tree_step_memory(self, logits: torch.Tensor) -> None:
        """Runs a full-size tree step during vLLM's memory profiling, so that the KV cache is sized
        with the tree build's and the verifier's peak reserved (the profile itself only runs the chain
        sampler over one draft per request)."""
        scheduler = self.runner.scheduler_config
        reserve_tree_step_memory(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, self.state.budget,
                                 self.state.depth, logits.shape[-1], logits.dtype, logits.device)


def reserve_tree_step_memory(max_num_seqs: int, max_num_batched_tokens: int, budget: int, depth: int, vocab: int,
                             dtype: torch.dtype, device) -> tuple[int, int]:
    """Drafts and verifies the largest tree step the scheduler can form, on random logits; returns
    (requests drafted, trees verified). A step verifies at most ``max_num_batched_tokens`` rows."""
    drafted = max_num_seqs
    verified = max(1, min(max_num_seqs, max_num_batched_tokens // (budget + 1)))
    tree = build_tree(torch.randn(drafted, depth, vocab, dtype=dtype, device=device), budget).take(slice(verified))
    logits = torch.randn(verified * (budget + 1), vocab, dtype=dtype, device=device)
    sampling = TreeSampling.uniform(verified, temperature=1.0, top_k=vocab // 2, top_p=0.9, min_p=0.1, device=device)
    verify_tree(tree, logits, sampling, torch.zeros(verified, dtype=torch.int64, device=device),
                row_starts=torch.arange(verified, device=device) * (budget + 1))
    return drafted, verified


def _tree_sampling(meta, num_reqs: int, device) -> TreeSampling:
    from vllm.utils.torch_utils import async_tensor_h2d

    zeros = torch.zeros(num_reqs, device=device)
    temperature = meta.temperature[:num_reqs].float() if meta.temperature is not None else zeros
    top_k = meta.top_k[:num_reqs].long() if meta.top_k is not None else zeros.long()
    top_p = meta.top_p[:num_reqs].float() if meta.top_p is not None else torch.ones_like(zeros)
    # Seeded requests keep their seed; the others draw fresh noise keys every step. vLLM keeps seeds
    # only in host-side generators, so they are gathered on the host and written in one async copy.
    seeds = torch.randint(0, 2**62, (num_reqs,), device=device)
    seeded = [(index, _as_int64(generator.initial_seed())) for index, generator in meta.generators.items()
              if index < num_reqs]
    if seeded:
        index, seed = async_tensor_h2d(seeded, device, torch.int64).T
        seeds[index] = seed
    # vLLM refuses min_p with any speculative method (SamplingParams._validate_spec_decode); the
    # history-dependent features (penalties, bad words, min_tokens, allowed_token_ids) are applied per
    # node by node_processing; what ddtree does not apply yet is refused on arrival (admission).
    return TreeSampling(temperature, top_k, top_p, torch.zeros_like(zeros), seeds, all_greedy=bool(meta.all_greedy),
                        all_random=bool(meta.all_random), truncated=meta.top_k is not None or meta.top_p is not None,
                        uses_min_p=False)


def _as_int64(seed: int) -> int:
    """torch keeps seeds as uint64 (a negative seed wraps): the same 64 bits, read as signed."""
    return seed - 2**64 if seed >= 2**63 else seed
