"""Exact distributions of the toy target, computed independently of vllm_ddtree.verify (numpy, per row)."""

import itertools

import numpy as np


def exact_distribution(target, context, length, temperature, top_k, top_p, min_p):
    """``{sequence: probability}`` of the first ``length`` tokens after ``context``, by enumeration."""
    table = target.table.numpy().astype(np.float64)
    dist = {}
    for seq in itertools.product(range(target.vocab), repeat=length):
        full = list(context) + list(seq)
        p = 1.0
        for t in range(length):
            row = table[full[len(context) + t - 2], full[len(context) + t - 1]]
            p *= processed_probs_numpy(row, temperature, top_k, top_p, min_p)[seq[t]]
        dist[seq] = p
    return dist


def processed_probs_numpy(row, temperature, top_k, top_p, min_p):
    """vLLM's processing of one row, written independently of vllm_ddtree.verify: temperature,
    min-p, top-k (ties at the cut kept), top-p (drop the ascending tail of mass <= 1 - p)."""
    x = row / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    x = np.where(p < min_p * p.max(), -np.inf, x)
    if 0 < top_k < len(x):
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1:
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(x, kind="stable")
        cum = np.cumsum(p[order])
        for i, idx in enumerate(order[:-1]):
            if cum[i] <= 1 - top_p:
                x[idx] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()
