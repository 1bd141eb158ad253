"""vLLM's sampling metadata -> the tree verifier's per-node logits processing
(:class:`vllm_ddtree.node_logits.NodeLogitsProcessing`).

What vLLM's rejection sampler applies to chain drafts (``RejectionSampler.apply_logits_processors``
in vLLM 0.32) is read from the same places: the input batch's ``allowed_token_ids`` mask, penalty
tensors and padded prompt tokens (on the device), the requests' output token lists and bad words (on
the host), and the ``MinTokensLogitsProcessor``'s per-request state. Host data goes down in one
async copy per feature (pinned on GPUs), only in steps where some request uses the feature.
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


def _min_tokens_state(meta) -> dict:
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    for processor in meta.logitsprocs.non_argmax_invariant:
        if isinstance(processor, MinTokensLogitsProcessor):
            return processor.min_toks
    return {}


def _add_bad_words(p: NodeLogitsProcessing, bad_words: dict, outputs, num_reqs: int, device) -> None:
    words = [bad_words.get(index, []) for index in range(num_reqs)]
    W = max(1, max(len(w) for w in words))
    M = max([len(word) - 1 for request in words for word in request] + [0])
    prefixes = np.full((num_reqs, W, M), ANY_TOKEN, dtype=np.int64)
    last = np.full((num_reqs, W), NO_TOKEN, dtype=np.int64)
    tail = np.full((num_reqs, M), NO_TOKEN, dtype=np.int64)
    for r, request in enumerate(words):
        for k, word in enumerate(request):
            last[r, k] = word[-1]
            if len(word) > 1:
                prefixes[r, k, M - len(word) + 1:] = word[:-1]
        if request and M:
            recent = outputs[r][-M:]
            if recent:
                tail[r, M - len(recent):] = recent
    p.bad_word_prefixes, p.bad_word_last, p.output_tail = (_upload(x, device) for x in (prefixes, last, tail))


def _padded(rows, pad: int, min_width: int = 0) -> np.ndarray:
    width = max([len(row) for row in rows] + [min_width])
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _upload(array: np.ndarray, device) -> torch.Tensor:
    from vllm.utils.torch_utils import async_tensor_h2d

    return async_tensor_h2d(array, device, torch.int64)
