"""Pure metric functions for the store and usage experiments (numpy in, floats/arrays out).

Conventions, chosen so that a figure can never look better than the data behind it:
- A cosine with a zero (empty) vector is undefined: it is NaN, and NaNs are left out of means
  (`nan_stats`), never counted as 0. Callers report how many slots were empty.
- Usage rows are normalised so the slots' mean is 1.0; a row whose total mass is 0 (nothing to
  read) is undefined (NaN) rather than a row of zeros or a fake uniform row.
- Evenness: normalised entropy (1.0 = perfectly even, 0.0 = one slot takes everything), min/max
  ratio, coefficient of variation (population std / mean; 0 = even).
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-8
DEAD = 0.1  # a slot whose mean usage is below this is dead
DOMINANT = 3.0  # a slot whose mean usage is above this dominates


def _arr(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def cosine_to_vector(slots, v) -> np.ndarray:
    """(s d) slots, (d) vector -> (s) cosines; NaN where the slot or the vector is ~zero."""
    slots, v = _arr(slots), _arr(v)
    ns = np.linalg.norm(slots, axis=-1)
    nv = np.linalg.norm(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = slots @ v / (ns * nv)
    cos[(ns < EPS) | (nv < EPS)] = np.nan
    return np.clip(cos, -1.0, 1.0)


def slot_cosine_matrix(slots) -> np.ndarray:
    """(s d) -> (s s) pairwise cosines between slots; NaN rows/columns for empty (~zero) slots."""
    slots = _arr(slots)
    n = np.linalg.norm(slots, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = slots / n[:, None]
    m = np.clip(unit @ unit.T, -1.0, 1.0)
    empty = n < EPS
    m[empty, :] = np.nan
    m[:, empty] = np.nan
    return m


def mean_offdiag(m) -> float:
    """Mean of the off-diagonal entries that are defined (NaN if none: fewer than 2 used slots)."""
    m = _arr(m)
    if m.shape[0] < 2:
        return math.nan
    vals = m[~np.eye(m.shape[0], dtype=bool)]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else math.nan


def nan_stats(x) -> dict:
    """mean, std (population), min, max over the finite values; NaN when there are none."""
    x = _arr(x).reshape(-1)
    x = x[np.isfinite(x)]
    if not x.size:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def trend(series, frac: float = 0.1) -> dict:
    """Mean of the first and of the last `frac` of a series (at least one value each), and their difference."""
    x = _arr(series).reshape(-1)
    k = max(1, int(len(x) * frac))
    first = nan_stats(x[:k])["mean"]
    last = nan_stats(x[-k:])["mean"]
    return {"first": first, "last": last, "delta": last - first, "window": k}


def normalise_usage(mass) -> np.ndarray:
    """(t s) attention mass -> usage with each row's mean over slots = 1.0; rows with no mass are NaN."""
    mass = _arr(mass)
    mean = mass.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = mass / mean
    u[(mean[..., 0] <= EPS)] = np.nan
    return u


def normalised_entropy(u) -> float:
    """Entropy of usage over slots / log(S): 1.0 = perfectly even, 0.0 = one slot. One slot: 1.0 (trivially even)."""
    u = _arr(u).reshape(-1)
    if not np.all(np.isfinite(u)) or u.sum() <= EPS:
        return math.nan
    if u.size == 1:
        return 1.0
    p = u / u.sum()
    nz = p[p > 0]
    return max(0.0, float(-(nz * np.log(nz)).sum() / math.log(u.size)))


def min_max_ratio(u) -> float:
    """min/max of usage over slots: 1.0 = even, 0.0 = some slot unused."""
    u = _arr(u).reshape(-1)
    if not np.all(np.isfinite(u)) or u.max() <= EPS:
        return math.nan
    return float(u.min() / u.max())


def cv(u) -> float:
    """Coefficient of variation of usage over slots (population std / mean): 0 = even."""
    u = _arr(u).reshape(-1)
    if not np.all(np.isfinite(u)) or abs(u.mean()) <= EPS:
        return math.nan
    return float(u.std() / u.mean())


def dead_slots(u, threshold: float = DEAD) -> list[int]:
    u = _arr(u).reshape(-1)
    return [int(i) for i in np.flatnonzero(np.isfinite(u) & (u < threshold))]


def dominant_slots(u, threshold: float = DOMINANT) -> list[int]:
    u = _arr(u).reshape(-1)
    return [int(i) for i in np.flatnonzero(np.isfinite(u) & (u > threshold))]


def evenness(u) -> dict:
    """Every evenness figure of one usage vector over slots."""
    return {
        "entropy": normalised_entropy(u),
        "min_max_ratio": min_max_ratio(u),
        "cv": cv(u),
        "dead_slots": dead_slots(u),
        "dominant_slots": dominant_slots(u),
    }


def random_unit_vectors(shape: tuple[int, ...], d: int, rng: np.random.Generator) -> np.ndarray:
    """Random directions: (*shape, d) Gaussian vectors scaled to unit length."""
    v = rng.standard_normal((*shape, d))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)
