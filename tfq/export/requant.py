"""Integer requantization that reproduces k-bit activation levels exactly.

An int8 conv computes, per output channel, ``acc = sum(w_int * (q - zp_in)) + B``
(int32) and then the output code ``round(M * acc)`` with a per-channel multiplier
``M = s_in * s_w / s_out``. The k-bit network computes the level
``L(A) = floor(c * A + beta + 0.5)`` of the integer weighted sum ``A = sum(m * i)``
(``m``: the odd weight codes, ``i``: the input codes). With integer weights
``w_int = t * m`` (``t = floor(127 / max|m|)``), ``acc = t * A + B``.

Rounding the real bias onto the int32 grid (``B = round(t * beta / c)``) shifts every
level boundary by up to half an accumulator step, which changes the level of the
values right at a boundary. Instead, ``fit`` searches, per channel, an integer ``B``
and a multiplier ``M = 1 / D`` such that every level boundary that a reachable ``A``
can cross falls strictly between the same two reachable accumulators as in the
k-bit network: the int8 layer then outputs exactly the k-bit levels for every
input. ``verify`` checks the result against TFLite's fixed-point arithmetic (both of
its rounding variants) and XNNPACK's float32 requantization.
"""

from __future__ import annotations

import numpy as np

INT32_MAX = 2**31 - 1


def quantize_multiplier(m):
    """TFLite's ``QuantizeMultiplier``: ``m ~= q * 2^(shift - 31)``, q in [2^30, 2^31).

    Args:
      m: positive float64 array.

    Returns:
      (q int64 array, shift int64 array).
    """
    m = np.asarray(m, np.float64)
    frac, shift = np.frexp(m)
    q = np.round(frac * 2.0**31).astype(np.int64)
    over = q == 2**31
    q = np.where(over, q // 2, q)
    shift = np.where(over, shift + 1, shift).astype(np.int64)
    return q, shift


def _rounding_divide_by_pot(x, exponent):
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def _srdhm(a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    s = ab + nudge
    # C++ integer division truncates toward zero.
    return np.where(s >= 0, s >> 31, -((-s) >> 31))


def multiply_double_rounding(acc, q, shift):
    """TFLite's default ``MultiplyByQuantizedMultiplier`` (two roundings)."""
    acc = np.asarray(acc, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return _rounding_divide_by_pot(_srdhm(acc * (np.int64(1) << left), q), right)


def multiply_single_rounding(acc, q, shift):
    """``MultiplyByQuantizedMultiplier`` built with ``TFLITE_SINGLE_ROUNDING``."""
    acc = np.asarray(acc, np.int64)
    total = 31 - shift
    return (acc * q + (np.int64(1) << (total - 1))) >> total


def multiply_fp32(acc, scale32):
    """XNNPACK's fp32 requantization: float32 product, round half to even."""
    return np.rint(np.asarray(acc, np.float32) * np.float32(scale32)).astype(np.int64)


def fit(c, beta, t, a_lo, a_hi, levels, *, search=None, top=4):
    """Per-channel integer bias and multiplier that reproduce the level thresholds.

    Args:
      c: (C,) positive float64: levels per unit of ``A``.
      beta: (C,) float64 level offset: the k-bit level is ``floor(c*A + beta + 0.5)``.
      t: (C,) int weight multiplier (``acc = t*A + B``).
      a_lo, a_hi: (C,) int reachable range of ``A``.
      levels: (L_first, L_last): the thresholds "level >= L" that must be exact
        (outside them the output saturates the same way in both models).
      search: how many integer biases to try on each side of the ideal one
        (default ``min(2*t + 4, 8)``: with a large ``t`` the rounded ideal bias
        already has ample slack).
      top: how many solutions (biases) to return per channel, widest first.

    Returns:
      (D_lo, D_hi float64 (C, top), B int64 (C, top), feasible bool (C, top)):
      every ``D`` in [D_lo, D_hi] with bias ``B`` is exact in real arithmetic.
      Infeasible entries hold the plain ``t/c`` and ``round(t*beta/c)``.
    """
    c = np.asarray(c, np.float64)
    beta = np.asarray(beta, np.float64)
    t = np.asarray(t, np.float64)
    a_lo = np.asarray(a_lo, np.float64)
    a_hi = np.asarray(a_hi, np.float64)
    L = np.arange(levels[0], levels[1] + 1, dtype=np.float64)  # (nL,)
    coef = L - 0.5
    theta = (coef[None, :] - beta[:, None]) / c[:, None]  # (C, nL): A >= theta <=> level >= L
    T = np.ceil(theta)
    d0 = t / c
    b0 = t * beta / c
    tt = t[:, None]
    # Keep each boundary clear of the reachable accumulators by more than float32
    # requantization can move it (XNNPACK multiplies in float32).
    mu = 0.02 + 1e-6 * np.abs(tt * theta + b0[:, None])
    lo = np.where(T <= a_lo[:, None], -np.inf, tt * (T - 1) + mu)
    hi = np.where(T > a_hi[:, None], np.inf, tt * T - mu)
    lo = np.where(T > a_hi[:, None], tt * a_hi[:, None] + 0.02, lo)
    hi = np.where(T <= a_lo[:, None], tt * a_lo[:, None] - 0.02, hi)
    k = int(search if search is not None else min(2 * int(t.max()) + 4, 8))
    cand = np.round(b0)[:, None] + np.arange(-k, k + 1)[None, :]  # (C, K)
    pos = coef > 0
    # (lo_L + B) <= coef_L * D <= (hi_L + B)
    lo_b = lo[:, None, :] + cand[:, :, None]
    hi_b = hi[:, None, :] + cand[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        d_min_terms = np.where(pos, lo_b / coef, hi_b / coef)
        d_max_terms = np.where(pos, hi_b / coef, lo_b / coef)
    d_min = np.nanmax(np.where(np.isnan(d_min_terms), -np.inf, d_min_terms), axis=2)
    d_max = np.nanmin(np.where(np.isnan(d_max_terms), np.inf, d_max_terms), axis=2)
    d_min = np.maximum(d_min, 0.0)
    # Finite midpoints: a one-sided interval is closed with the ideal multiplier.
    d_lo = np.where(np.isfinite(d_min), d_min, d0[:, None])
    d_hi = np.where(np.isfinite(d_max), d_max, np.maximum(d0[:, None], d_lo) * 2)
    d_lo = np.where(np.isfinite(d_min), d_lo, np.minimum(d0[:, None], d_hi) / 2)
    width = (d_hi - d_lo) / np.maximum(d_hi + d_lo, 1e-300)
    feasible = (d_max > d_min) & (width > 1e-6)
    score = np.where(feasible, width, -np.inf)
    rank = np.argsort(-score, axis=1, kind="stable")[:, :top]  # (C, top)
    rows = np.arange(len(c))[:, None]
    ok = feasible[rows, rank]
    lo_out = np.where(ok, d_lo[rows, rank], d0[:, None])
    hi_out = np.where(ok, d_hi[rows, rank], d0[:, None])
    B = np.where(ok, cand[rows, rank], np.round(b0)[:, None])
    return lo_out, hi_out, B.astype(np.int64), ok


def runtime_multipliers(s_in, s_w, s_out):
    """(float64 multiplier of TFLite's kernels, float32 one of XNNPACK) per channel."""
    s_in32, s_out32 = np.float32(s_in), np.float32(s_out)
    s_w32 = np.asarray(s_w, np.float32)
    double = np.float64(s_in32) * s_w32.astype(np.float64) / np.float64(s_out32)
    single = (s_in32 * s_w32) / s_out32  # float32 arithmetic
    return double, single.astype(np.float32)


def requantized_levels(acc, multiplier, variant):
    """Output code (before zero point / clamping) of TFLite's requantization."""
    if variant == "fp32":
        return multiply_fp32(acc, multiplier)
    q, shift = quantize_multiplier(multiplier)
    if variant == "double":
        return multiply_double_rounding(acc, q, shift)
    return multiply_single_rounding(acc, q, shift)


VARIANTS = ("double", "single", "fp32")


def verify(c, beta, t, a_lo, a_hi, levels, B, s_in, s_w, s_out, count=False):
    """Which channels give the k-bit levels at every threshold, per requantization.

    The multipliers are computed from the float32 scales as the runtimes do:
    ``double`` (TFLite's default fixed-point kernels), ``single`` (TFLite built with
    single rounding), ``fp32`` (XNNPACK, LiteRT's default CPU path for int8).

    Returns:
      {variant: bool (C,)}, or with ``count`` the number of wrong level boundaries
      per channel, {variant: int (C,)}.
    """
    double, single = runtime_multipliers(s_in, s_w, s_out)
    c = np.asarray(c, np.float64)
    L = np.arange(levels[0], levels[1] + 1, dtype=np.int64)
    theta = (L[None, :] - 0.5 - np.asarray(beta)[:, None]) / c[:, None]
    T = np.ceil(theta).astype(np.int64)
    t = np.asarray(t, np.int64)[:, None]
    a_lo = np.asarray(a_lo, np.int64)[:, None]
    a_hi = np.asarray(a_hi, np.int64)[:, None]
    B = np.asarray(B, np.int64)[:, None]
    fits32 = np.all(np.abs(t * np.maximum(np.abs(a_lo), np.abs(a_hi)) + np.abs(B))
                    < INT32_MAX, axis=1)
    result = {}
    above = np.clip(T, a_lo, a_hi)        # smallest reachable A that must reach level L
    below = np.clip(T - 1, a_lo, a_hi)    # largest reachable A that must stay below L
    need_above = T <= a_hi
    need_below = T - 1 >= a_lo
    for variant in ("double", "single", "fp32"):
        m = (single if variant == "fp32" else double)[:, None]
        hi_code = requantized_levels(t * above + B, m, variant)
        lo_code = requantized_levels(t * below + B, m, variant)
        good = np.where(need_above, hi_code >= L, True) & np.where(need_below, lo_code < L, True)
        if count:
            result[variant] = np.where(fits32, (~good).sum(axis=1), good.shape[1])
        else:
            result[variant] = good.all(axis=1) & fits32
    return result


def solve(c, beta, t, a_lo, a_hi, levels, s_in, s_out, candidates=25):
    """Exact per-channel weight scale and bias for given input / output scales.

    Runs ``fit``, then tries ``candidates`` multipliers across each channel's exact
    interval (TFLite's double rounding moves the boundaries by up to one
    accumulator step, so the middle of the interval is not always the best) and
    keeps the first that every requantization variant reproduces; failing that,
    one that XNNPACK and single-rounding TFLite reproduce.

    Returns:
      (s_w float64 (C,), B int64 (C,), tier int (C,)): tier 2 = exact in every
      variant, 1 = exact with XNNPACK / single rounding, 0 = not exact.
    """
    d_lo, d_hi, B, _ = fit(c, beta, t, a_lo, a_hi, levels)  # (C, top)
    C, top = B.shape
    frac = (np.arange(candidates) + 0.5) / candidates
    frac = frac[np.argsort(np.abs(frac - 0.5), kind="stable")]  # middle first
    D = d_lo[:, :, None] + frac[None, None, :] * (d_hi - d_lo)[:, :, None]  # (C, top, K)
    D = D.reshape(C, -1)
    Bk = np.repeat(B, candidates, axis=1)  # (C, top*K)
    K = D.shape[1]
    s_w = (1.0 / D) * np.float64(np.float32(s_out)) / np.float64(np.float32(s_in))

    def rep(a):
        return np.repeat(np.asarray(a), K, axis=0)

    ok = verify(rep(c), rep(beta), rep(t), rep(a_lo), rep(a_hi), levels, Bk.reshape(-1), s_in,
                s_w.reshape(-1), s_out)
    every = (ok["double"] & ok["single"] & ok["fp32"]).reshape(C, K)
    fast = (ok["single"] & ok["fp32"]).reshape(C, K)
    tier = np.where(every.any(axis=1), 2, np.where(fast.any(axis=1), 1, 0))
    pick = np.where(every.any(axis=1), np.argmax(every, axis=1), np.argmax(fast, axis=1))
    rows = np.arange(C)
    s_w, B = s_w[rows, pick], Bk[rows, pick]
    miss = np.flatnonzero(tier == 0)
    if miss.size:
        sub = (lambda a: np.asarray(a)[miss])
        s_w[miss], B[miss] = _fewest_wrong(sub(c), sub(beta), sub(t), sub(a_lo), sub(a_hi),
                                           levels, s_in, s_out)
    return s_w, B, tier


def _fewest_wrong(c, beta, t, a_lo, a_hi, levels, s_in, s_out, n_d=41, n_b=9):
    """Best effort where no exact solution exists: the multiplier and bias (near the
    plain ones) that get the fewest level boundaries wrong on XNNPACK (then TFLite)."""
    C = len(c)
    t = np.asarray(t, np.float64)
    d0, b0 = t / c, np.round(t * beta / c)
    top = max(abs(levels[0]), abs(levels[1])) + 0.5
    span = t / top  # moves the outermost boundary by one accumulator step of t
    D = d0[:, None] + np.linspace(-1.0, 1.0, n_d)[None, :] * span[:, None]     # (C, n_d)
    half = min(int(t.max() // 2), n_b // 2)
    Bs = b0[:, None] + np.arange(-half, half + 1)[None, :]                      # (C, n_b)
    D = np.repeat(D, Bs.shape[1], axis=1)
    Bs = np.tile(Bs, (1, n_d))
    K = D.shape[1]
    s_w = (1.0 / D) * np.float64(np.float32(s_out)) / np.float64(np.float32(s_in))

    def rep(a):
        return np.repeat(np.asarray(a), K, axis=0)

    wrong = verify(rep(c), rep(beta), rep(t.astype(np.int64)), rep(a_lo), rep(a_hi), levels,
                   Bs.reshape(-1).astype(np.int64), s_in, s_w.reshape(-1), s_out, count=True)
    score = wrong["fp32"].reshape(C, K) * 1000 + wrong["double"].reshape(C, K)
    pick = np.argmin(score, axis=1)
    rows = np.arange(C)
    return s_w[rows, pick], Bs[rows, pick].astype(np.int64)
