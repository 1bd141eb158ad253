"""Round step 2b, *budget*: how many of its drafted nodes each request verifies this step.

A tree of B nodes makes the target verify B + 1 rows where a plain step verifies one. Where a step's
cost grows with its rows (any CPU; a GPU at batch > 1) a fixed B loses to the chain, and at large
batches speculation loses to plain decoding. The rule here is CaDDTree's (arXiv 2606.01813), batched:
take all requests' nodes in one best-first order of their drafter path probability delta (the order
DDTree's heap pops them), and keep adding the next node while expected tokens per second still rise:

    delta * (C_draft + C_step(n)) > (R + Phi) * (C_step(n + 1) - C_step(n))

with n the step's query rows so far (one per request, plus the nodes taken), Phi the sum of the
deltas taken and R the requests' bonus tokens (every request emits one token whatever it accepts).
With C_step convex in n the first stop is the optimum. Then the tree as a whole must beat plain
decoding, whose step pays neither the drafter nor the extra rows: (R + Phi) / (C_draft + C_step(n))
against R / C_step(n0); where it does not, no request keeps a node. Each request keeps a prefix of
its nodes in pop order (its own deltas never increase along it), possibly none.

In:  ``scores [R, B]`` (the tree's path log-probabilities, -inf in unused slots), a :class:`StepCosts`.
Out: ``kept [R]`` int64, nodes to verify per request. Fixed shapes, on the device, no host read.

:class:`StepCosts` holds C_step(rows) and C_draft(requests) as dense device tables, made from timed
samples (at engine start, or a user's table) by a monotone convex fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCosts:
    """Seconds of a target step by query rows (``step [N+1]``, rows 0..N; rows past N cannot be
    scheduled) and of a drafter pass by requests (``draft [M+1]``), float64 tables on one device."""

    step: torch.Tensor
    draft: torch.Tensor

    @classmethod
    def from_samples(cls, step_samples: dict[int, float], draft_samples: dict[int, float], max_rows: int,
                     max_requests: int, device=None) -> "StepCosts":
        """Dense tables from timed samples ``{rows: seconds}`` / ``{requests: seconds}``: the greatest
        non-decreasing convex minorant of the samples (see :func:`convex_table`)."""
        return cls(convex_table(step_samples, max_rows, device), convex_table(draft_samples, max_requests, device))

    def to(self, device) -> "StepCosts":
        return StepCosts(self.step.to(device), self.draft.to(device))


def convex_table(samples: dict[int, float], size: int, device=None) -> torch.Tensor:
    """``[size + 1]`` float64 at x = 0..size: the greatest non-decreasing convex function below the
    samples (their lower convex hull, linear between and beyond its points, flattened before its
    minimum). At least two samples, x >= 0."""
    points = sorted((float(x), float(y)) for x, y in samples.items())
    if len(points) < 2:
        raise ValueError(f"a cost curve needs at least two samples, got {samples}")
    hull: list[tuple[float, float]] = []
    for p in points:  # Andrew's monotone chain, lower part
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    xs = torch.tensor([x for x, _ in hull], dtype=torch.float64)
    ys = torch.tensor([y for _, y in hull], dtype=torch.float64)
    grid = torch.arange(size + 1, dtype=torch.float64)
    segment = (torch.searchsorted(xs, grid, right=True) - 1).clamp(0, len(hull) - 2)
    x0, x1, y0, y1 = xs[segment], xs[segment + 1], ys[segment], ys[segment + 1]
    table = (y0 + (grid - x0) * (y1 - y0) / (x1 - x0)).clamp(min=0)
    # The largest non-decreasing function below it: flat up to its minimum, then the hull (still convex).
    return torch.cummin(table.flip(0), 0).values.flip(0).to(device)


class AcceptanceCalibration:
    """How much of what the drafter expects the target accepts: a running ratio, on the device, of the
    nodes accepted to the sum of the verified nodes' deltas (the drafter's own expectation of them).
    DFlash's per-depth marginals multiplied along a path are overconfident, and the budget rule
    would otherwise verify trees that do not pay. Starts at 1 (the drafter taken at its word)."""

    def __init__(self, device, weight: float = 0.05, floor: float = 0.02, ceiling: float = 2.0):
        self.value = torch.ones((), dtype=torch.float64, device=device)
        self.weight, self.floor, self.ceiling = weight, floor, ceiling

    def update(self, scores: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """After a verify step: ``scores [R, B]`` of the verified trees (-inf past each one's nodes)
        and the nodes each accepted ``[R]``. Steps that verified no node leave it as it is."""
        expected = scores.double().exp().sum()
        ratio = (num_accepted.sum().double() / expected.clamp(min=1e-9)).clamp(self.floor, self.ceiling)
        updated = (1 - self.weight) * self.value + self.weight * ratio
        self.value = torch.where(expected > 0, updated, self.value)


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def kept_nodes(scores: torch.Tensor, costs: StepCosts, base_rows: torch.Tensor | int | None = None,
               calibration: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Nodes each request verifies under the rule above: ``kept [R]`` int64.

    ``base_rows``: the step's rows before any node (default R: one per request; a tensor keeps it on
    the device). Nodes whose step would pass the table's rows are never kept. ``calibration`` scales
    every delta (a drafter's path probabilities overstate what the target accepts: see
    :class:`AcceptanceCalibration`); it does not change the order.
    """
    R, B = scores.shape
    dev = scores.device
    flat = scores.double().flatten()
    order = torch.argsort(flat, descending=True, stable=True)  # delta = exp(score): the same order
    d, valid = flat[order].exp() * calibration, flat[order] > float("-inf")
    # Host numbers become device values by a fill, not an upload: nothing here waits on a copy.
    n0 = base_rows.to(torch.int64) if isinstance(base_rows, torch.Tensor) else torch.full(
        (), R if base_rows is None else base_rows, dtype=torch.int64, device=dev)
    N = costs.step.shape[0] - 1
    rows = n0 + torch.arange(R * B, device=dev)  # the step's rows before node k is added
    inf = torch.full((), float("inf"), dtype=torch.float64, device=dev)
    here = torch.where(rows <= N, costs.step[rows.clamp(max=N)], inf)
    there = torch.where(rows + 1 <= N, costs.step[(rows + 1).clamp(max=N)], inf)
    draft = costs.draft[min(R, costs.draft.shape[0] - 1)]
    phi = torch.cumsum(d, 0) - d
    extra = there - here  # NaN or inf past the table: never pays
    # A node whose row costs nothing more always pays (however small its delta, even 0 by underflow).
    pays = valid & ((extra == 0) | (d * (draft + here) > (R + phi) * extra))
    taken = torch.cumprod(pays.to(torch.int64), 0)  # the first node that does not pay ends the tree
    # The tree as a whole must also beat plain decoding, which pays neither the drafter nor its rows:
    # (R + Phi) / (C_draft + C_step(n0 + K)) against R / C_step(n0).
    K = taken.sum()
    expected = R + (d * taken).sum()
    with_tree = expected * costs.step[n0.clamp(max=N)]
    without = R * (draft + costs.step[(n0 + K).clamp(max=N)])
    taken = taken * (with_tree > without)
    return torch.zeros(R, dtype=torch.int64, device=dev).scatter_add_(0, order // B, taken)
