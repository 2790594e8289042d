"""The store/usage metrics on hand-built cases whose answers are known."""

import math

import numpy as np
import pytest

from imm_cli.experiments import metrics as M


def test_identical_slots_have_slot_cosine_one():
    v = np.array([0.3, -1.0, 2.0, 0.5])
    slots = np.stack([v, v, v, 2 * v])
    m = M.slot_cosine_matrix(slots)
    assert np.allclose(m, 1.0)
    assert M.mean_offdiag(m) == pytest.approx(1.0)


def test_orthogonal_slots_have_slot_cosine_zero():
    assert M.mean_offdiag(M.slot_cosine_matrix(np.eye(4))) == pytest.approx(0.0)


def test_empty_slots_are_undefined_not_zero():
    slots = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    cos = M.cosine_to_vector(slots, np.array([1.0, 0.0]))
    assert cos[0] == pytest.approx(1.0) and math.isnan(cos[1]) and cos[2] == pytest.approx(1.0)
    assert M.nan_stats(cos)["mean"] == pytest.approx(1.0)  # the empty slot is left out, not averaged as 0
    m = M.slot_cosine_matrix(slots)
    assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all()
    assert M.mean_offdiag(m) == pytest.approx(1.0)
    assert math.isnan(M.mean_offdiag(M.slot_cosine_matrix(np.zeros((3, 2)))))


def test_cosine_with_opposite_vector():
    assert M.cosine_to_vector(np.array([[1.0, 2.0]]), np.array([-2.0, -4.0]))[0] == pytest.approx(-1.0)


def test_one_used_slot():
    u = M.normalise_usage(np.array([[5.0, 0.0, 0.0, 0.0]]))[0]
    assert u.mean() == pytest.approx(1.0)
    e = M.evenness(u)
    assert e["entropy"] == pytest.approx(0.0)
    assert e["min_max_ratio"] == pytest.approx(0.0)
    assert e["cv"] == pytest.approx(math.sqrt(3))
    assert e["dead_slots"] == [1, 2, 3] and e["dominant_slots"] == [0]


def test_uniform_usage():
    u = M.normalise_usage(np.full((3, 8), 0.7))
    assert np.allclose(u, 1.0)
    e = M.evenness(u[0])
    assert e["entropy"] == pytest.approx(1.0)
    assert e["min_max_ratio"] == pytest.approx(1.0)
    assert e["cv"] == pytest.approx(0.0)
    assert e["dead_slots"] == [] and e["dominant_slots"] == []


def test_two_of_four_slots_even():
    u = np.array([2.0, 2.0, 0.0, 0.0])
    assert M.normalised_entropy(u) == pytest.approx(0.5)  # log 2 / log 4


def test_row_without_mass_is_undefined():
    u = M.normalise_usage(np.array([[0.0, 0.0], [1.0, 3.0]]))
    assert np.isnan(u[0]).all()
    assert np.allclose(u[1], [0.5, 1.5])
    assert math.isnan(M.normalised_entropy(u[0]))


def test_trend_first_and_last_tenth():
    tr = M.trend(np.arange(50, dtype=float))
    assert tr["window"] == 5 and tr["first"] == pytest.approx(2.0) and tr["last"] == pytest.approx(47.0)
    assert tr["delta"] == pytest.approx(45.0)
    assert M.trend([3.0])["delta"] == 0.0


def test_random_unit_vectors():
    v = M.random_unit_vectors((1000,), 64, np.random.default_rng(0))
    assert np.allclose(np.linalg.norm(v, axis=-1), 1.0)
    cos = M.cosine_to_vector(v, v[0])
    assert abs(np.mean(cos[1:])) < 0.02  # random directions: mean cosine ~ 0
