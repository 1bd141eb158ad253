"""The acceptance benchmark's tie report: where a greedy output parts from autoregressive output, how
far apart the two tokens were in the autoregressive run."""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from bench_acceptance import divergence_gaps  # noqa: E402


def test_divergence_gaps():
    reference = [[5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6]]
    top = [{5: -0.1, 9: -2.0}, {6: -0.5, 8: -0.75, 4: -3.0}, {7: -0.2}]
    mine = [[5, 6, 7],      # equal: no entry
            [5, 8, 1],      # parts at 1, at the runner-up: 0.25
            [5, 4, 7],      # parts at 1, at the third token: 2.5
            [9, 6, 7],      # parts at 0: 1.9
            [5, 6, 7, 1]]   # longer than the reference: not a tie
    gaps = divergence_gaps(mine, reference, [top] * 5)
    assert len(gaps) == 4 and gaps[:2] == [0.25, 2.5]
    assert math.isclose(gaps[2], 1.9) and math.isinf(gaps[3])
    # a token outside the reference's top log-probabilities: not a near tie
    assert divergence_gaps([[5, 3, 7]], [[5, 6, 7]], [top]) == [math.inf]
