"""The exact requantization search (tfq.export.requant) against brute force in NumPy."""

import numpy as np
import pytest

from tfq.export import requant


def _reference_levels(c, beta, a):
    """k-bit level of every accumulator value, in float64 real arithmetic."""
    return np.floor(c * a + beta + 0.5)


def _tflite_levels(acc, multiplier, variant):
    return requant.requantized_levels(acc, multiplier, variant)


@pytest.mark.parametrize("m", [1e-6, 3.3e-4, 0.0123, 0.5, 0.999999, 1.0, 3.7, 250.0])
def test_quantize_multiplier_matches_definition(m):
    q, shift = requant.quantize_multiplier(np.array([m]))
    assert 2**30 <= q[0] < 2**31
    assert abs(q[0] * 2.0 ** (shift[0] - 31) - m) <= m * 2**-30


def test_fixed_point_multiply_rounds_like_tflite():
    # Ties by hand: gemmlowp's high-mul adds 2^30 (or 1 - 2^30 below zero) and then
    # truncates, so +3.5 -> 4 and -3.5 -> -3; XNNPACK's float path rounds half to even.
    q, shift = requant.quantize_multiplier(np.array([0.5]))
    acc = np.array([7, -7, 6, 1000003])
    np.testing.assert_array_equal(requant.multiply_double_rounding(acc, q, shift),
                                  [4, -3, 3, 500002])
    np.testing.assert_array_equal(requant.multiply_single_rounding(acc, q, shift),
                                  [4, -3, 3, 500002])  # single rounding: half up
    np.testing.assert_array_equal(requant.multiply_fp32(acc, np.float32(0.5)), [4, -4, 3, 500002])


@pytest.mark.parametrize("levels,t,seed", [((1, 3), 42, 0), ((1, 15), 8, 1), ((-14, 15), 16, 2),
                                           ((1, 31), 16, 3)])
def test_solve_reproduces_every_reachable_level(levels, t, seed):
    """Every accumulator value in range gets the float64 level in every TFLite variant."""
    rng = np.random.default_rng(seed)
    channels = 24
    n_out = levels[1]
    c = rng.uniform(0.002, 0.05, channels) * 15 / n_out
    beta = rng.normal(0.0, 2.0, channels)
    a_lo = np.full(channels, -3000)
    a_hi = np.full(channels, 3000)
    tt = np.full(channels, t)
    s_in, s_out = 6 / 15, 6 / n_out
    s_w, B, tier = requant.solve(c, beta, tt, a_lo, a_hi, levels, s_in, s_out)
    assert (tier >= 1).mean() > 0.8
    a = np.arange(-3000, 3001)
    double, single = requant.runtime_multipliers(s_in, s_w, s_out)
    for ch in np.flatnonzero(tier >= 1):
        want = np.clip(_reference_levels(c[ch], beta[ch], a), levels[0] - 1, levels[1])
        acc = t * a + B[ch]
        variants = ["single", "fp32"] + (["double"] if tier[ch] == 2 else [])
        for variant in variants:
            m = single[ch] if variant == "fp32" else double[ch]
            got = np.clip(_tflite_levels(acc, np.full(acc.shape, m), variant), levels[0] - 1,
                          levels[1])
            np.testing.assert_array_equal(got, want, err_msg=f"channel {ch} {variant}")


def test_plain_bias_rounding_is_not_exact():
    """The naive construction (rounded bias, plain multiplier) misses some levels: the
    search above is what makes the int8 layers exact."""
    rng = np.random.default_rng(5)
    c = rng.uniform(0.01, 0.05, 200)
    beta = rng.normal(0.0, 2.0, 200)
    a = np.arange(-2000, 2001)
    wrong = 0
    for ch in range(200):
        want = np.clip(_reference_levels(c[ch], beta[ch], a), 0, 3)
        got = np.clip(np.floor(c[ch] * (a + np.round(beta[ch] / c[ch])) + 0.5), 0, 3)
        wrong += int(np.sum(got != want))
    assert wrong > 0


def test_verify_flags_a_broken_channel():
    c = np.array([0.02, 0.02])
    beta = np.array([0.3, 0.3])
    t = np.array([4, 4])
    lo, hi = np.array([-500, -500]), np.array([500, 500])
    s_w, B, tier = requant.solve(c, beta, t, lo, hi, (1, 3), 2.0, 2.0)
    assert (tier == 2).all()
    broken = B.copy()
    broken[1] += 3 * 4  # shifts every boundary of channel 1 by three accumulator steps
    ok = requant.verify(c, beta, t, lo, hi, (1, 3), broken, 2.0, s_w, 2.0)
    assert ok["double"][0] and not ok["double"][1]
    assert ok["fp32"][0] and not ok["fp32"][1]


def _exact_form_widths(c, beta, t, a_lo, a_hi, levels, span=400):
    """Relative widths of the multiplier intervals that make a channel exact, by brute force.

    For every integer bias ``B`` within ``span`` of the ideal one, the multipliers ``D``
    with ``ceil(((L - 1/2) D - B) / t) == ceil(theta_L)`` for every level boundary ``L``
    that a reachable ``A`` can cross, in real arithmetic (no runtime rounding).
    """
    L = np.arange(levels[0], levels[1] + 1, dtype=np.float64)
    T = np.ceil((L - 0.5 - beta) / c)
    inside = (T > a_lo) & (T <= a_hi)
    L, T = L[inside], T[inside]
    widths = []
    for B in np.round(t * beta / c) + np.arange(-span, span + 1):
        lo = np.max((t * (T - 1) + B) / (L - 0.5))
        hi = np.min((t * T + B) / (L - 0.5))
        if hi > lo:
            widths.append((hi - lo) / (hi + lo))
    return widths


@pytest.mark.parametrize("levels,t,seed", [((1, 15), 8, 0), ((1, 15), 4, 1), ((1, 3), 42, 2)])
def test_solve_finds_an_exact_form_whenever_one_exists(levels, t, seed):
    """The bias search is wide enough: every channel that has a clear exact solution
    (interval wider than 1e-4 relative) gets one, and none is claimed where none exists."""
    rng = np.random.default_rng(seed)
    n = 120
    c = rng.uniform(0.002, 0.05, n) * 15 / levels[1]
    beta = rng.normal(0.0, 2.0, n)
    a_lo, a_hi = np.full(n, -3000), np.full(n, 3000)
    _, _, tier = requant.solve(c, beta, np.full(n, t), a_lo, a_hi, levels, 6 / 15, 6 / levels[1])
    widths = [_exact_form_widths(c[i], beta[i], t, -3000, 3000, levels) for i in range(n)]
    clear = np.array([max(w, default=0.0) > 1e-4 for w in widths])
    exists = np.array([bool(w) for w in widths])
    assert clear.sum() > n // 2
    assert (tier[clear] >= 1).all()
    assert not (tier[~exists] >= 1).any()


def test_a_channel_with_no_exact_form_gets_the_best_effort():
    """A 4-bit channel of a first conv (fed by the 8-bit input, so ``t = 8`` only) seen in
    a trained model: its level thresholds sit 0.007 above and 0.018 below integers at
    the two ends of the level range, and no integer bias within 400 steps of the ideal
    has any exact multiplier. ``solve`` says so (tier 0) and its best effort gets one
    of the 40,036 reachable accumulators wrong in each runtime rounding."""
    c, beta = np.array([0.009565428381308938]), np.array([-3.937602461727786])
    t, a_lo, a_hi = np.array([8]), np.array([-20035]), np.array([20000])
    s_in, s_out = 0.007843137718737125, 0.4000000059604645
    assert _exact_form_widths(c[0], beta[0], 8, -20035, 20000, (1, 15)) == []
    s_w, B, tier = requant.solve(c, beta, t, a_lo, a_hi, (1, 15), s_in, s_out)
    assert tier[0] == 0
    a = np.arange(-20035, 20001)
    want = np.clip(_reference_levels(c[0], beta[0], a), 0, 15)
    double, single = requant.runtime_multipliers(s_in, s_w, s_out)
    for variant in requant.VARIANTS:
        m = single[0] if variant == "fp32" else double[0]
        got = np.clip(_tflite_levels(8 * a + B[0], np.full(a.shape, m), variant), 0, 15)
        assert (got != want).sum() == 1, variant
