"""The synthetic renderer: deterministic items, the biased split, ideal counterfactuals."""
import numpy as np
import torch

from cfx_cli.data.synthetic import SyntheticDataset, SyntheticWorld


def test_items_depend_only_on_seed_split_and_index():
    ds = SyntheticDataset(split="test", num_images=10, seed=3)
    a = ds.batch([0, 1, 2, 3])
    b = ds.batch([3, 1])  # another batch composition
    torch.testing.assert_close(a["x"][3], b["x"][0])
    torch.testing.assert_close(a["x"][1], b["x"][1])
    other_split = SyntheticDataset(split="val", num_images=10, seed=3).batch([0])
    assert not torch.equal(a["x"][0], other_split["x"][0])
    assert a["x"].shape == (4, 3, 32, 32) and a["x"].min() >= -1 and a["x"].max() <= 1


def test_biased_split_ties_background_to_shape_with_rho():
    world = SyntheticWorld(rho=0.95)
    f = world.sample(np.random.default_rng(0), 4000)
    aligned = np.array([b in world.preferred_backgrounds(s) for s, b in zip(f["shape"], f["bg_colour"])])
    assert abs(aligned.mean() - 0.95) < 0.015
    clean = SyntheticWorld().sample(np.random.default_rng(0), 4000)
    aligned_clean = np.array([b in world.preferred_backgrounds(s) for s, b in zip(clean["shape"], clean["bg_colour"])])
    assert abs(aligned_clean.mean() - 0.5) < 0.03


def test_ideal_counterfactual_changes_only_the_object():
    world = SyntheticWorld()
    f = world.sample(np.random.default_rng(1), 8)
    x = world.render(f)
    x_ideal = world.ideal_counterfactual(f, shape=1 - f["shape"])
    changed = (x - x_ideal).abs().sum(1) > 1e-6  # N×H×W
    # Pixels far from the object centre (background) are untouched; near it, the shape differs.
    h = world.image_size
    yy, xx = np.mgrid[0:h, 0:h] + 0.5
    for i in range(8):
        dist = np.hypot(xx - f["pos_x"][i] * h, yy - f["pos_y"][i] * h)
        reach = world.size_of(f["size"][i]) * h * 1.3 + 1
        assert not changed[i][torch.from_numpy(dist > reach)].any()
        assert changed[i].any()
    # Equal-area shapes: the mean colour barely moves when only the shape changes.
    assert (x.mean((2, 3)) - x_ideal.mean((2, 3))).abs().max() < 0.05


def test_sizes_and_positions_keep_the_object_inside():
    world = SyntheticWorld(shapes=("circle", "square", "triangle"), size_range=(0.16, 0.30))
    f = world.sample(np.random.default_rng(2), 500)
    f["size"][:] = 1.0  # the largest objects
    x = world.render(f)
    bg = torch.tensor(np.array([[0.10, 0.15, 0.40], [0.10, 0.32, 0.15], [0.38, 0.10, 0.12], [0.30, 0.30, 0.30]]),
                      dtype=torch.float32)[torch.as_tensor(f["bg_colour"])] * 2 - 1
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # N×3×4H
    assert torch.allclose(border, bg[:, :, None].expand_as(border), atol=1e-5)
