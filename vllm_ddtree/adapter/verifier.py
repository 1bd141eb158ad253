"""Round steps 4 and 5 in vLLM: the tree verifier, and the whole commit.

:class:`TreeVerifier` stands in for vLLM's rejection sampler (the V1 runner's ``rejection_sampler``
gets it as its ``forward``: same call, same output format, -1 padded rows). On a tree step it takes
the target's logits over every request's tree rows, processes each node's row as vLLM's sampler
would (:mod:`~vllm_ddtree.adapter.logits_processing`), picks one target token per node and walks each
tree (:func:`vllm_ddtree.verify.verify_tree`), then commits: the accepted path's target KV is moved
behind the prefix (:mod:`vllm_ddtree.kv_commit`, through the attention backend's ``commit``) in the
same call, and the drafter's input rows of the step (its hidden states and positions) when vLLM
hands them to the drafter later in the step (:func:`commit_drafter_inputs`), so that the drafter sees
what a chain that accepted the same tokens leaves it. Steps without trees go to vLLM's own samplers.

In:  the step's :class:`~vllm_ddtree.adapter.state.StepTrees`, flat logits ``[T, V]``, vLLM's
     sampling metadata. Out: vLLM's ``SamplerOutput`` (``[R, D+1]`` tokens, -1 after each path).
"""

from __future__ import annotations

import torch

from vllm_ddtree.adapter.logits_processing import V2BadWords, node_processing, v2_node_processing
from vllm_ddtree.adapter.state import DDTreeState, StepTrees
from vllm_ddtree.adapter.step_layout import write_chain_positions
from vllm_ddtree.kv_commit import commit_accepted_rows, plan_commit
from vllm_ddtree.node_logits import node_processor
from vllm_ddtree.verify import TreeSampling, row_layout, verify_tree


class TreeVerifier:
    """vLLM's ``RejectionSampler.forward`` for a ddtree runner: same call, same output format.

    ``chain_forward``: the rejection sampler's own forward, for vLLM's profiling and warm-up runs
    (dummy drafts, no trees); ``sampler``: its plain sampler, for steps in which no request drafted.
    """

    def __init__(self, state: DDTreeState, chain_forward, sampler):
        self.state = state
        self.chain_forward = chain_forward
        self.sampler = sampler

    def __call__(self, metadata, draft_probs, logits, sampling_metadata, *args, **kwargs):
        from vllm.v1.outputs import SamplerOutput

        step = self.state.step
        if step is None and metadata.max_spec_len == 0:
            # No request has a draft (a cost-aware engine decoding plainly): one logits row per request,
            # sampled as an engine without speculation samples it, without the rejection machinery.
            return self.sampler(logits, sampling_metadata, predict_bonus_token=True)
        if step is None:  # vLLM's profiling and warm-up runs (dummy drafts, no trees)
            return self.chain_forward(metadata, draft_probs, logits, sampling_metadata, *args, **kwargs)
        dev = logits.device
        num_draft = step.num_draft
        first = metadata.cu_num_sampled_tokens.to(dev, torch.int64) - (num_draft + 1)
        sampling = _tree_sampling(sampling_metadata, num_draft.shape[0], dev)
        processing = node_processing(sampling_metadata, num_draft.shape[0], logits.shape[-1], dev)
        verdict = _verify_and_commit(self.state, step, logits, sampling, first, processing)
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

        sampler = self.sampler
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



class V2TreeVerifier:
    """vLLM Model Runner V2's ``RejectionSampler`` for a ddtree runner: same call, same output
    (``SamplerOutput`` with ``sampled_token_ids [R, B+1]``, the accepted path's tokens and the bonus
    token left-aligned, ``num_sampled`` = path length + 1 and ``num_rejected`` = the rest of the
    request's rows, both as vLLM's own ``get_num_sampled_and_rejected`` leaves them for chunked
    prefills; sample logprobs, where asked, one row per emitted token). Verification and the KV
    commit run in the call, before vLLM's state update and the drafter's pass, which overwrites this
    step's slot mappings with its own.

    Each node's row is processed as V2's sampler processes a row (its logits processors with the
    node's path as history, :func:`~vllm_ddtree.adapter.logits_processing.v2_node_processing`; then
    temperature and top-k/top-p) before the target's token there is picked.

    ``chain``: vLLM's rejection sampler, for vLLM's own warm-up runs (dummy drafts, no trees);
    ``sampler``: V2's sampler, whose per-request states (indexed by request-state slot) give each
    request's parameters, seed and logits processors; ``req_states``: V2's request states (prompt
    lengths, committed tokens). :meth:`add_request` must see every request V2's sampler adds.
    """

    def __init__(self, state: DDTreeState, chain, sampler, req_states, budget: int):
        self.state = state
        self.chain = chain
        self.sampler = sampler
        self.req_states = req_states
        self.budget = budget
        self.bad_words = V2BadWords()

    def add_request(self, slot: int, sampling_params) -> None:
        self.bad_words.add_request(slot, sampling_params)

    def __call__(self, logits, input_batch, draft_logits=None, invalid_drafts=None):
        from vllm.v1.worker.gpu.input_batch import get_num_sampled_and_rejected
        from vllm.v1.worker.gpu.metrics.logits import get_num_nans
        from vllm.v1.worker.gpu.sample.output import SamplerOutput

        step = self.state.step
        if step is None:
            return self.chain(logits, input_batch, draft_logits, invalid_drafts)
        num_nans = get_num_nans(logits) if self.sampler.compute_nans else None  # before any processing, as V2
        num_reqs = input_batch.num_reqs
        first = input_batch.cu_num_logits[:num_reqs].to(torch.int64)
        sampling = _v2_tree_sampling(self.sampler.sampling_states, input_batch)
        processing = v2_node_processing(self.sampler, self.req_states, input_batch, step.root_positions,
                                        self.bad_words)
        verdict = _verify_and_commit(self.state, step, logits, sampling, first, processing)
        # vLLM's layout has B+1 slots a request; a path holds at most min(B, D) + 1 tokens.
        width = self.budget + 1
        sampled = verdict.output_tokens[:, :width]
        if sampled.shape[1] < width:
            sampled = torch.nn.functional.pad(sampled, (0, width - sampled.shape[1]), value=-1)
        num_sampled, num_rejected = get_num_sampled_and_rejected(
            (verdict.num_accepted + 1).to(torch.int32), input_batch.seq_lens, input_batch.cu_num_logits,
            input_batch.idx_mapping, self.req_states.prefill_len.gpu)
        logprobs = None
        dims = self.sampler.get_logprobs_dims(input_batch.idx_mapping_np)
        if dims is not None:
            logprobs = self._logprobs(logits, first, step.tree, verdict, input_batch, processing, *dims)
        return SamplerOutput(sampled_token_ids=sampled.contiguous(), logprobs_tensors=logprobs, num_nans=num_nans,
                             num_sampled=num_sampled, num_rejected=num_rejected)

    def _logprobs(self, logits, first, tree, verdict, input_batch, processing, num_logprobs: int,
                  max_token_ids: int):
        """Logprobs of each emitted token at the node the target sampled it from, as V2's samplers
        compute them (its kernels, its logprobs modes, each request's ``logprob_token_ids``): one row
        per path slot, W = D + 1 a request; vLLM reads each request's first ``num_sampled``."""
        import numpy as np
        from vllm.v1.worker.gpu.sample.logprob import compute_topk_scores

        R, W = verdict.accepted_nodes.shape
        node_rows = (first.unsqueeze(1) + verdict.accepted_nodes.clamp(min=0)).flatten()
        rows = logits[node_rows]
        expanded = input_batch.idx_mapping.repeat_interleave(W)
        mode = self.sampler.logprobs_mode
        if mode.startswith("processed"):
            rows = rows.to(torch.float32, copy=True)
            if processing is not None:
                node_processor(processing, tree, *row_layout(first, logits.shape[0], tree.max_nodes))(rows, node_rows)
            states, host = self.sampler.sampling_states, np.repeat(input_batch.idx_mapping_np, W)
            states.apply_temperature(rows, expanded, host)
            rows = states.apply_top_k_top_p(rows, expanded, host)
        return compute_topk_scores(rows, num_logprobs, verdict.output_tokens.flatten().clamp(min=0),
                                   list(range(0, R * W + 1, W)), self.sampler.logprob_token_ids_state, expanded,
                                   max_token_ids, logits_mode=mode.endswith("logits"))


def _verify_and_commit(state: DDTreeState, step: StepTrees, logits, sampling, first, processing):
    """Round steps 4 and 5, on either runner: the tree verified on the target's logits (rows from
    ``first``), the calibration told what was accepted, the accepted path's KV committed."""
    verdict = verify_tree(step.tree, logits, sampling, step.root_positions, row_starts=first, processing=processing)
    step.accepted_nodes = verdict.accepted_nodes
    if state.calibration is not None:
        state.calibration.update(step.tree.scores, verdict.num_accepted)
    _commit_kv(state, step, verdict.accepted_nodes)
    return verdict


def _commit_kv(state: DDTreeState, step: StepTrees, accepted_nodes: torch.Tensor) -> None:
    """Round step 5 on the target's caches: the accepted path's KV behind its root."""
    target = state.target
    plan = plan_commit(step.attention.block_table, target.kv_caches[0].shape[2], step.root_positions, accepted_nodes)
    target.backend.commit(target.kv_caches, target.kv_layout, plan)


def _v2_tree_sampling(states, input_batch) -> TreeSampling:
    """Each request's sampling parameters from V2's sampling states (by request-state slot). V2 keeps
    a seed for every request (drawn at random where the request has none), so every request's noise
    is keyed by its seed and each node's position, as V2's own samplers key theirs."""
    index, host = input_batch.idx_mapping, input_batch.idx_mapping_np
    temperature = states.temperature.np[host]
    truncated = bool((states.top_k.np[host] < states.vocab_size).any() or (states.top_p.np[host] < 1).any())
    return TreeSampling(states.temperature.gpu[index], states.top_k.gpu[index].long(), states.top_p.gpu[index],
                        torch.zeros_like(states.temperature.gpu[index]), states.seeds.gpu[index],
                        all_greedy=bool((temperature == 0).all()), all_random=bool((temperature != 0).all()),
                        truncated=truncated, uses_min_p=False)


def commit_drafter_inputs(step: StepTrees, hidden_states: list[torch.Tensor], positions: torch.Tensor) -> None:
    """The commit of the drafter's side, on the rows vLLM hands it after a verified tree step: each
    accepted path's rows of every per-token tensor in ``hidden_states`` (the target's hidden states,
    and on V2 each auxiliary layer's) moved to the front of its rows (the KV commit's permutation), and
    every tree row its sequential position back. DFlash reads a request's rows as a chain (the first
    ``query_len - rejected`` are the accepted context) and writes each row's context K/V at the slot of
    its position: it then sees exactly what a chain step that accepted the same tokens gives it, and
    rejected nodes cannot overwrite the accepted positions' drafter KV."""
    for rows in hidden_states:
        commit_accepted_rows(rows, step.root_rows, step.accepted_nodes)
    write_chain_positions(positions, step)


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
