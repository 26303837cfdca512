"""DVCE's pieces against closed forms: the cone projection and the augmentations."""
import math

import pytest
import torch

from cfx_cli.methods.augment import dvce_augment
from cfx_cli.methods.base import SampleRNG
from cfx_cli.methods.dvce import cone_projection


def _rng(*seeds):
    """A SampleRNG whose sample i draws from a generator seeded ``seeds[i]``."""
    rng = SampleRNG(0, range(len(seeds)))
    rng.generators = [torch.Generator().manual_seed(s) for s in seeds]
    return rng


def _angle(a, b):
    a, b = a.flatten(1), b.flatten(1)
    return torch.rad2deg(torch.acos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))))


def test_cone_projection_outside_is_the_cone_edge_towards_the_robust_gradient():
    # explained gradient along e1, robust along e2 (90° apart): the 30° edge is (1, tan 30°) normalised
    g = torch.tensor([[3.0, 0.0, 0.0]])
    g_r = torch.tensor([[0.0, 2.0, 0.0]])
    out = cone_projection(g, g_r, 30.0)
    expected = torch.tensor([[1.0, math.tan(math.radians(30)), 0.0]])
    torch.testing.assert_close(out, expected / expected.norm())
    assert _angle(out, g).item() == pytest.approx(30.0, abs=1e-4)


def test_cone_projection_inside_public_and_corrected():
    # robust gradient 10° from the explained one: inside a 30° cone
    g = torch.tensor([[1.0, 0.0]])
    g_r = torch.tensor([[math.cos(math.radians(10)), math.sin(math.radians(10))]]) * 5
    torch.testing.assert_close(cone_projection(g, g_r, 30.0, "explained"), g)  # the public code
    torch.testing.assert_close(cone_projection(g, g_r, 30.0, "robust"), g_r / 5)  # its own projection


def test_cone_projection_lies_in_the_cone_for_random_gradients():
    gen = torch.Generator().manual_seed(0)
    g, g_r = torch.randn(64, 3, 8, 8, generator=gen), torch.randn(64, 3, 8, 8, generator=gen)
    for inside in ("explained", "robust"):
        out = cone_projection(g, g_r, 30.0, inside)
        assert (_angle(out, g) <= 30.0 + 1e-3).all()
        torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.ones(64))
        # of the cone's directions it is the one closest to the robust gradient: no closer than g_r itself
        assert (_angle(out, g_r) + 1e-3 >= _angle(g_r, g) - 30.0).all()


def test_augment_keeps_the_first_copy_and_is_per_sample():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = dvce_augment(x, 4, _rng(1, 2))
    assert out.shape == (8, 3, 16, 16)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[4], x[1])
    assert not torch.allclose(out[1], x[0])
    # the second sample's copies depend on its own generator only
    alone = dvce_augment(x[1:], 4, _rng(2))
    torch.testing.assert_close(alone, out[4:])
    assert torch.equal(dvce_augment(x, 1, _rng(1, 2)), x)


def test_augment_identity_when_never_applied_and_differentiable():
    x = (torch.rand(1, 3, 12, 12) * 2 - 1).requires_grad_(True)
    out = dvce_augment(x, 3, _rng(0), p=0.0)
    torch.testing.assert_close(out, x.expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    out = dvce_augment(x, 3, _rng(0))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_augment_rotation_matches_a_hand_rotation():
    # a 90°-symmetric check: rotate a pattern by the drawn angle with translate=0, no perspective, and
    # compare the centre pixel (fixed under rotation about the centre) with the input's
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = dvce_augment(x, 2, _rng(3), translate=0.0, p=1.0, distortion=0.0)
    assert out[1, 0, 4, 4].item() == pytest.approx(1.0, abs=0.3)
