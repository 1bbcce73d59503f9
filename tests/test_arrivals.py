import itertools

import numpy as np
import pytest
from scipy import stats

from replay.schedule.arrivals import ArrivalSpec, mean_rate, offsets


def take(spec: ArrivalSpec, n: int, seed: int = 1) -> np.ndarray:
    return np.array(list(itertools.islice(offsets(spec, seed), n)))


def test_poisson_gaps_pass_ks_against_exponential():
    rate = 50.0
    t = take(ArrivalSpec("poisson", rate), 20_000)
    gaps = np.diff(np.concatenate([[0.0], t]))
    res = stats.kstest(gaps, "expon", args=(0, 1 / rate))
    assert res.pvalue > 0.01
    assert abs(len(t) / t[-1] - rate) / rate < 0.03


def test_ks_rejects_a_non_exponential_process():
    """The KS check above has teeth: constant gaps at the same mean rate fail it."""
    t = take(ArrivalSpec("constant", 50.0), 2000)
    res = stats.kstest(np.diff(t), "expon", args=(0, 1 / 50.0))
    assert res.pvalue < 1e-6


def test_same_seed_same_schedule_other_seed_differs():
    a = take(ArrivalSpec("poisson", 10), 100, seed=7)
    b = take(ArrivalSpec("poisson", 10), 100, seed=7)
    c = take(ArrivalSpec("poisson", 10), 100, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_constant_is_exact():
    t = take(ArrivalSpec("constant", 4.0), 8)
    assert np.allclose(t, np.arange(1, 9) / 4.0)
    t0 = list(itertools.islice(offsets(ArrivalSpec("constant", 4.0), 0, first_at_zero=True), 3))
    assert t0 == [0.0, 0.25, 0.5]


@pytest.mark.parametrize("b", [0.25, 1.0, 4.0])
def test_gamma_mean_rate_and_burstiness(b):
    rate = 20.0
    t = take(ArrivalSpec("gamma", rate, burstiness=b), 40_000)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 1 / rate) / (1 / rate) < 0.03
    # Coefficient of variation of Gamma(b, 1/b) gaps is 1/sqrt(b).
    assert abs(gaps.std() / gaps.mean() - 1 / np.sqrt(b)) < 0.05


def test_ramp_follows_integrated_rate():
    spec = ArrivalSpec("constant", 10.0, ramp_to=30.0, ramp_s=10.0)
    t = np.array(list(itertools.takewhile(lambda x: x < 10.0, offsets(spec, 0))))
    assert (
        len(t) == 199
    )  # Lambda(10) = 10*10 + 20*10/2 = 200 arrivals at s = 1..200, the 200th at exactly t=10
    assert mean_rate(spec, 10.0) == pytest.approx(20.0)
    # First half carries Lambda(5) = 50 + 25 = 75 requests.
    assert (t < 5.0).sum() == 74
    assert np.all(np.diff(t) > 0)


def test_invalid_specs_are_reported():
    assert ArrivalSpec("poisson", 0).problems()
    assert ArrivalSpec("poisson", -1).problems()
    assert ArrivalSpec("zipf", 1).problems()
    assert ArrivalSpec("gamma", 1, burstiness=0).problems()
    assert not ArrivalSpec("gamma", 1, burstiness=0.5).problems()
