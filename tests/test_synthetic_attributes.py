"""The synthetic benchmark's factors as binary attributes: MNAC/CD's oracle and training labels."""
import numpy as np
import torch

from cfx_cli import ZOO_DIR
from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.metrics.attributes import binarise, correlations
from cfx_cli.metrics.synthetic_attributes import attribute_names, attribute_oracle, train_labels

NAMES = attribute_names(("circle", "square"))


def by_hand(f) -> np.ndarray:
    rows = []
    for i in range(len(f["shape"])):
        row = [int(f["shape"][i] == 0), int(f["shape"][i] == 1)]
        row += [int(f["obj_colour"][i] == k) for k in range(3)] + [int(f["bg_colour"][i] == k) for k in range(4)]
        row += [int(f["size"][i] > 0.5), int(f["pos_x"][i] > 0.5), int(f["pos_y"][i] > 0.5)]
        rows.append(row)
    return np.array(rows)


def test_training_labels_are_the_training_splits_factors():
    labels = train_labels(num_images=300, seed=0)
    f = SyntheticWorld().factors_for_indices("train", range(300), 0)
    assert NAMES[:2] == ["shape=circle", "shape=square"] and labels.shape == (300, len(NAMES))
    assert np.array_equal(labels, by_hand(f))
    rho = correlations(labels, NAMES.index("shape=square"))
    assert rho[0] == -1.0 and rho[1] == 1.0  # the two shapes of a two-class world: closed form
    assert np.abs(rho[2:]).max() < 0.2  # the clean split draws the other factors independently of the shape
    biased = correlations(train_labels(num_images=300, seed=0, rho=0.95), NAMES.index("shape=square"))
    # the biased split pairs squares with backgrounds 1 and 3 (label 1 = index mod 2)
    assert biased[NAMES.index("bg_colour=1")] > 0.3 and biased[NAMES.index("bg_colour=0")] < -0.3


def test_the_factor_oracle_reads_the_attributes_of_rendered_images():
    world = SyntheticWorld()
    f = world.factors_for_indices("test", range(64), 0)
    oracle = attribute_oracle(str(ZOO_DIR / "synthetic_oracle"))
    with torch.no_grad():
        read = binarise(oracle(world.render(f)), 0.0)
    truth = by_hand(f)
    discrete = slice(0, 9)  # shape and colours: read exactly
    assert (read[:, discrete] == truth[:, discrete]).mean() == 1.0
    # size and position near 0.5 may fall either side: most agree
    assert (read[:, 9:] == truth[:, 9:]).mean() > 0.9
    assert oracle.query_for("classification") == 1 and NAMES[oracle.query_for("regression")] == "large"
