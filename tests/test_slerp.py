"""Slerp (Equation 3): endpoints, norms, the formula, and the edge cases without NaN."""

import math

import pytest
import torch

from pegasus_dist.model.slerp import slerp


def test_endpoints_are_exact():
    torch.manual_seed(0)
    q1, q2 = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.equal(slerp(q1, q2, 0.0), q1)
    assert torch.equal(slerp(q1, q2, 1.0), q2)


def test_matches_the_paper_formula():
    torch.manual_seed(1)
    q1, q2 = torch.randn(16), torch.randn(16)
    mu = 0.3
    theta = math.acos(float((q1 / q1.norm()) @ (q2 / q2.norm())))
    expected = (math.sin((1 - mu) * theta) * q1 + math.sin(mu * theta) * q2) / math.sin(theta)
    assert torch.allclose(slerp(q1, q2, mu), expected, atol=1e-5)


def test_unit_vectors_stay_on_the_sphere():
    torch.manual_seed(2)
    q1 = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    q2 = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    mus = torch.linspace(0, 1, 11)[:, None]
    path = slerp(q1[:, None], q2[:, None], mus)
    assert path.shape == (4, 11, 32)
    assert torch.allclose(path.norm(dim=-1), torch.ones(4, 11), atol=1e-5)


def test_90_degrees_midpoint():
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


@pytest.mark.parametrize("mu", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_parallel_vectors_interpolate_linearly(mu):
    q1 = torch.tensor([1.0, 2.0, 3.0])
    q2 = 2 * q1
    assert torch.allclose(slerp(q1, q2, mu), (1 + mu) * q1, atol=1e-5)  # (1 - mu) q1 + mu q2


@pytest.mark.parametrize("mu", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_antiparallel_vectors_turn_through_the_axis_least_aligned_with_them(mu):
    """No unique great circle: the path turns from q1 through e3 (q1 has no z) to -q1 on the
    unit circle, cos(pi mu) q1 + sin(pi mu) e3: orthogonal to both ends halfway."""
    q1 = torch.tensor([0.6, 0.8, 0.0])
    expected = math.cos(math.pi * mu) * q1 + math.sin(math.pi * mu) * torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(slerp(q1, -q1, mu), expected, atol=1e-6)


def test_identical_and_zero_vectors_give_no_nan():
    q = torch.tensor([0.3, -0.2])
    assert torch.allclose(slerp(q, q, 0.4), q)
    # A zero vector has no direction: it counts as orthogonal to q, so the path is the
    # formula's at theta = pi/2, sin(mu pi/2) q, from 0 to q.
    for mu in (0.0, 0.4, 1.0):
        assert torch.allclose(slerp(torch.zeros(2), q, mu), math.sin(mu * math.pi / 2) * q, atol=1e-7)
