"""The benchmarks' paired-ratio statistics: the interval for a median covers it as often as it says.

The speed claims of ``bench/`` (qgraph's ``.pte`` against torchao's, its ``.onnx`` against
ONNX Runtime's quantizer) rest on ``timing.paired_ratio``; these tests check its interval
against the binomial order statistics it claims to use and by simulation.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from timing import interleaved_rounds, loaded, median_interval, paired_ratio  # noqa: E402


@pytest.mark.parametrize("n", [6, 10, 30, 61, 2000])
def test_interval_is_the_sign_test_order_statistics(n):
    """k is the largest count with P(Binomial(n, 1/2) <= k - 1) <= 2.5 %; the interval is [x_(k), x_(n+1-k)]."""
    k = max(j for j in range(1, n + 1) if binom.cdf(j - 1, n, 0.5) <= 0.025)
    values = [float(v) for v in random.Random(n).sample(range(10 * n), n)]
    ordered = sorted(values)
    assert median_interval(values) == (ordered[k - 1], ordered[n - k])


def test_interval_covers_the_median_at_its_stated_confidence():
    """2,000 draws of 30 skewed values: the interval holds the true median in 95.7 % of them.

    For n = 30 the exact coverage is 1 - 2 P(B <= 9) = 0.957; with 2,000 trials its standard
    error is 0.0045, so [0.94, 0.975] is a band of about ±3.5 standard errors.
    """
    rng = random.Random(0)
    mu = math.log(2.0) / 2  # lognormal(mu, 0.3) has median e**mu = sqrt 2: skewed like latencies
    true_median = math.exp(mu)
    trials = 2000
    covered = 0
    for _ in range(trials):
        low, high = median_interval([rng.lognormvariate(mu, 0.3) for _ in range(30)])
        covered += low <= true_median <= high
    assert 0.94 <= covered / trials <= 0.975


def test_paired_ratio_verdicts():
    rng = random.Random(1)
    theirs = [0.005 * (1 + 0.03 * rng.random()) for _ in range(30)]
    noise = [1 + 0.01 * (rng.random() - 0.5) for _ in range(30)]
    assert paired_ratio([0.9 * t for t in theirs], theirs)["verdict"] == "faster"
    assert paired_ratio([1.1 * t for t in theirs], theirs)["verdict"] == "slower"
    tie = paired_ratio([t * e for t, e in zip(theirs, noise)], theirs)
    assert tie["verdict"] == "tie" and tie["interval"][0] <= 1.0 <= tie["interval"][1]
    assert tie["rounds"] == 30


def test_too_few_rounds_and_unpaired_rounds_are_refused():
    with pytest.raises(ValueError, match="at least 6 rounds"):
        paired_ratio([1.0] * 5, [1.0] * 5)
    with pytest.raises(ValueError, match="one time per round"):
        paired_ratio([1.0] * 6, [1.0] * 7)


def test_rounds_interleave_the_functions():
    """Each round calls every function in turn, settle calls then the timed block; instances take turns."""
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": [lambda: calls.append("b0"), lambda: calls.append("b1")]}
    rounds = interleaved_rounds(fns, warmup=1, rounds=3, settle=1, block=2)
    assert calls == ["a", "b0", "b1"] + ["a"] * 3 + ["b0"] * 3 + ["a"] * 3 + ["b1"] * 3 + ["a"] * 3 + ["b0"] * 3
    assert {k: len(v) for k, v in rounds.items()} == {"a": 3, "b": 3}


def test_loaded_makes_separate_instances_called_on_the_arguments():
    loads: list[list[int]] = []

    def load():
        seen: list[int] = []
        loads.append(seen)
        return seen.append

    calls = loaded(load, 3, 7)
    assert len(loads) == 3 and all(seen == [] for seen in loads)
    for call in calls:
        call()
    assert loads == [[7], [7], [7]]
