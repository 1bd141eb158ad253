"""vLLM's per-request sampling state -> the tree verifier's per-node logits processing
(:class:`vllm_ddtree.node_logits.NodeLogitsProcessing`), for either model runner.

V1 (:func:`node_processing`): what vLLM's rejection sampler applies to chain drafts
(``RejectionSampler.apply_logits_processors`` in vLLM 0.32) is read from the same places: the input
batch's ``allowed_token_ids`` mask, penalty tensors and padded prompt tokens (on the device), the
requests' output token lists and bad words (on the host), and the ``MinTokensLogitsProcessor``'s
per-request state.

V2 (:func:`v2_node_processing`): V2's sampler keeps every request's state by request-state slot,
on the device: allowed tokens, stop tokens and minimum lengths (``LogitBiasState``), penalties with
each request's output token counts and prompt-token bits (``PenaltiesState``), the committed tokens
(``RequestState.all_token_ids``). Its bad words live on the device in a layout that needs their
lengths on the host; those come from :class:`V2BadWords`, a host copy made as requests arrive.

Host data goes down in one async copy per feature (pinned on GPUs), only in steps where some request
uses the feature; nothing is read back.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_ddtree.node_logits import ANY_TOKEN, NO_TOKEN, NodeLogitsProcessing


def node_processing(meta, num_reqs: int, vocab: int, device) -> NodeLogitsProcessing | None:
    """The step's processing for the batch's first ``num_reqs`` requests, or None if no request uses
    any of the features."""
    p = NodeLogitsProcessing()
    if meta.allowed_token_ids_mask is not None:
        p.disallowed = meta.allowed_token_ids_mask[:num_reqs]
    if not meta.no_penalties:
        # Prompts come padded with the vocabulary size, the one id no token has.
        p.prompt_tokens = meta.prompt_token_ids[:num_reqs].clamp(max=vocab)
        p.output_tokens = _upload(_padded(meta.output_token_ids[:num_reqs], vocab), device)
        p.presence = meta.presence_penalties[:num_reqs]
        p.frequency = meta.frequency_penalties[:num_reqs]
        p.repetition = meta.repetition_penalties[:num_reqs]
    if meta.bad_words_token_ids:
        _add_bad_words(p, meta.bad_words_token_ids, meta.output_token_ids, num_reqs, device)
    min_tokens = _min_tokens_state(meta)
    if min_tokens:
        left = np.zeros(num_reqs, dtype=np.int64)
        stops = [[] for _ in range(num_reqs)]
        for index, (minimum, output, stop_ids, *_) in min_tokens.items():
            if index < num_reqs and stop_ids:
                left[index], stops[index] = minimum - len(output), sorted(stop_ids)
        p.min_tokens_left = _upload(left, device)
        p.stop_token_ids = _upload(_padded(stops, NO_TOKEN, 1), device)
    return p if p.any else None


def v2_node_processing(sampler, req_states, input_batch, root_positions: torch.Tensor,
                       bad_words: "V2BadWords") -> NodeLogitsProcessing | None:
    """The step's processing from vLLM V2's sampler states, for the batch's requests in order
    (``root_positions [R]``: each request's root position), or None if no request uses any feature.
    Host reads are of V2's host mirrors only."""
    from vllm.v1.worker.gpu.sample.bad_words import BadWordsState
    from vllm.v1.worker.gpu.sample.logit_bias import LogitBiasState

    host = input_batch.idx_mapping_np
    if not sampler.needs_logits_processing[host].any():
        return None
    index = input_batch.idx_mapping.to(torch.int64)
    vocab = sampler.sampling_states.vocab_size
    p = NodeLogitsProcessing()
    bias = next(x for x in sampler.logits_processors if isinstance(x, LogitBiasState))
    if (bias.num_allowed_token_ids.np[host] > 0).any():
        p.disallowed = _listed_tokens_only(bias.allowed_token_ids.gpu[index], bias.num_allowed_token_ids.gpu[index],
                                           vocab)
    if (bias.num_stop_token_ids.np[host] > 0).any():
        # V2 bans a request's stop tokens at a row of position pos while pos + 1 < prompt + min_tokens;
        # a node of depth d sits at the root's position + d.
        p.min_tokens_left = bias.min_lens.gpu[index].to(torch.int64) - 1 - root_positions.to(torch.int64)
        p.stop_token_ids = _first(bias.stop_token_ids.gpu[index], bias.num_stop_token_ids.gpu[index], NO_TOKEN)
    penalties = sampler.penalties_state
    if penalties.use_penalty[host].any():
        p.presence = penalties.presence_penalty.gpu[index]
        p.frequency = penalties.frequency_penalty.gpu[index]
        p.repetition = penalties.repetition_penalty.gpu[index]
        p.output_counts = penalties.output_bin_counts[index]
        p.prompt_seen = _unpacked_bits(penalties.prompt_bin_mask[index], vocab)
    if (next(x for x in sampler.logits_processors if isinstance(x, BadWordsState)).num_bad_words.np[host] > 0).any():
        _add_v2_bad_words(p, [bad_words.of(slot) for slot in host.tolist()], req_states, index, root_positions.device)
    return p if p.any else None


class V2BadWords:
    """Each request-state slot's bad words (token ids per word) on the host, recorded as V2's sampler
    adds a request (its own copy is on the device, flattened, without the word lengths the verifier
    needs to lay the words out)."""

    def __init__(self):
        self._words: dict[int, list[list[int]]] = {}

    def add_request(self, slot: int, sampling_params) -> None:
        words = getattr(sampling_params, "bad_words_token_ids", None)
        if words:
            self._words[slot] = [list(w) for w in words]
        else:
            self._words.pop(slot, None)

    def of(self, slot: int) -> list[list[int]]:
        return self._words.get(slot, [])


def _add_v2_bad_words(p: NodeLogitsProcessing, words: list, req_states, index: torch.Tensor, device) -> None:
    """The bad words' layout (:func:`_add_bad_words`), each request's output tail read on the device
    from V2's committed tokens."""
    prefixes, last, M = _bad_word_layout(words)
    p.bad_word_prefixes, p.bad_word_last = _upload(prefixes, device), _upload(last, device)
    total = req_states.total_len.gpu[index].to(torch.int64)
    columns = total.unsqueeze(1) - M + torch.arange(M, device=device)  # the last M committed tokens
    output = columns >= req_states.prompt_len.gpu[index].to(torch.int64).unsqueeze(1)
    tokens = req_states.all_token_ids.gpu[index].gather(1, columns.clamp(min=0)).to(torch.int64)
    p.output_tail = torch.where(output, tokens, NO_TOKEN)


def _listed_tokens_only(token_ids: torch.Tensor, counts: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[R, V]`` bool: the tokens outside each request's first ``counts`` ``token_ids`` (none for a
    request with no list)."""
    listed = _first(token_ids, counts, vocab)  # padding goes to a spare column
    outside = (counts > 0).unsqueeze(1).expand(-1, vocab + 1).clone()
    outside.scatter_(1, listed, False)
    return outside[:, :vocab]


def _first(values: torch.Tensor, counts: torch.Tensor, pad: int) -> torch.Tensor:
    """Each row's first ``counts`` values (int64), the rest ``pad``."""
    columns = torch.arange(values.shape[1], device=values.device)
    return torch.where(columns < counts.unsqueeze(1), values.to(torch.int64), pad)


def _unpacked_bits(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[R, ceil(V/32)]`` int32 bit words (token t: word t // 32, bit t % 32) -> ``[R, V]`` bool."""
    bits = torch.arange(32, device=packed.device, dtype=packed.dtype)
    return ((packed.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab].bool()


def _min_tokens_state(meta) -> dict:
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    for processor in meta.logitsprocs.non_argmax_invariant:
        if isinstance(processor, MinTokensLogitsProcessor):
            return processor.min_toks
    return {}


def _add_bad_words(p: NodeLogitsProcessing, bad_words: dict, outputs, num_reqs: int, device) -> None:
    words = [bad_words.get(index, []) for index in range(num_reqs)]
    prefixes, last, M = _bad_word_layout(words)
    tail = np.full((num_reqs, M), NO_TOKEN, dtype=np.int64)
    for r, request in enumerate(words):
        if request and M:
            recent = outputs[r][-M:]
            if recent:
                tail[r, M - len(recent):] = recent
    p.bad_word_prefixes, p.bad_word_last, p.output_tail = (_upload(x, device) for x in (prefixes, last, tail))


def _bad_word_layout(words: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per request, each bad word's tokens but its last, right-aligned in M columns (``ANY_TOKEN``
    padding), and its last token (``NO_TOKEN`` for padding words); M = the longest prefix."""
    W = max(1, max(len(w) for w in words))
    M = max([len(word) - 1 for request in words for word in request] + [0])
    prefixes = np.full((len(words), W, M), ANY_TOKEN, dtype=np.int64)
    last = np.full((len(words), W), NO_TOKEN, dtype=np.int64)
    for r, request in enumerate(words):
        for k, word in enumerate(request):
            last[r, k] = word[-1]
            if len(word) > 1:
                prefixes[r, k, M - len(word) + 1:] = word[:-1]
    return prefixes, last, M


def _padded(rows, pad: int, min_width: int = 0) -> np.ndarray:
    width = max([len(row) for row in rows] + [min_width])
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _upload(array: np.ndarray, device) -> torch.Tensor:
    from vllm.utils.torch_utils import async_tensor_h2d

    return async_tensor_h2d(array, device, torch.int64)
