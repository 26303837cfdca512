"""The papers' set-level metrics against values computed independently: FID / sFID / KID (realism.py),
MNAC / CD (attributes.py), COUT (cout.py), and the feature networks' weights handling."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from cfx_cli import ZOO_DIR
from cfx_cli.metrics import attributes as A
from cfx_cli.metrics import realism as R
from cfx_cli.metrics.cout import auc, cout, insertion_curves
from cfx_cli.objectives import ClassificationObjective

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster on a busy machine


def gaussians(n1=400, n2=300, d=4, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n1, d))
    mix = rng.normal(size=(d, d)) * 0.5 + np.eye(d)
    b = rng.normal(size=(n2, d)) @ mix + np.linspace(0.5, 1.5, d)
    return a, b


def closed_form_fid(a, b):
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), with numpy / scipy only (unbiased covariances)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


# ------------------------------------------------------------------------------------------------ realism
def test_fid_matches_the_closed_form_of_two_gaussians():
    a, b = gaussians()
    assert R.fid(a, b) == pytest.approx(closed_form_fid(a, b), rel=1e-8, abs=1e-10)
    assert R.fid(torch.tensor(a), torch.tensor(a)) == pytest.approx(0.0, abs=1e-8)
    assert np.isnan(R.fid(a[:1], b))  # a Gaussian needs two points


def test_sfid_is_a_seeded_mean_of_cross_half_fids():
    a, b = gaussians(400, 400)
    full = R.fid(a, b)
    s = R.sfid(a, b, splits=4, seed=3)
    assert s == R.sfid(a, b, splits=4, seed=3)  # seeded: reproducible
    assert s != R.sfid(a, b, splits=4, seed=4)
    assert s == pytest.approx(full, rel=0.25)  # halves of the same sets: a FID-like value
    # by hand, one split: the mean of FID(real_A, cf_B) and FID(real_B, cf_A) over the generator's halving
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(7)).numpy()
    h1, h2 = perm[:200], perm[200:]
    assert R.sfid(a, b, splits=1, seed=7) == pytest.approx(
        (closed_form_fid(a[h1], b[h2]) + closed_form_fid(a[h2], b[h1])) / 2, rel=1e-8)
    # a counterfactual is never compared with its own original: identical pairs give FID 0 but sFID > 0
    assert R.fid(a, a) == pytest.approx(0, abs=1e-8) and R.sfid(a, a, splits=2) > 0.01
    # only the successful counterfactuals count
    ok = np.zeros(400, bool)
    ok[:200] = True
    assert R.realism(torch.tensor(a), torch.tensor(b), ok, names=("fid",))["fid"] == pytest.approx(
        closed_form_fid(a, b[:200]), rel=1e-8)


def test_kid_of_identical_sets_is_about_zero():
    a, b = gaussians(300, 300)
    same, _ = R.kid(a, a, subsets=50, subset_size=100, seed=0)
    other, _ = R.kid(a, b, subsets=50, subset_size=100, seed=0)
    assert other > 0.1 and abs(same) < 0.02 * other
    assert R.kid(a, b, subsets=5, subset_size=50, seed=1) == R.kid(a, b, subsets=5, subset_size=50, seed=1)
    before = torch.get_rng_state()
    R.kid(a, b, subsets=5, subset_size=50)
    assert torch.equal(before, torch.get_rng_state())  # the global generator is left alone
    assert R.kid(a, b[:10], subsets=2)[0] > 0  # subset size capped at the smaller set


def test_oracle_features_are_the_oracles_penultimate_layer():
    from cfx_cli.models.small_cnn import zoo_oracle

    net = R.build_extractor("oracle", oracle=str(ZOO_DIR / "synthetic_oracle"))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    oracle = zoo_oracle(str(ZOO_DIR / "synthetic_oracle"))
    with torch.no_grad():
        f = R.extract(net, x, batch_size=2)
        assert torch.allclose(f.float(), oracle.trunk(x), atol=1e-6)
        assert torch.allclose(oracle.continuous(f.float()), oracle(x)["continuous"], atol=1e-5)


def test_missing_weights_are_reported_never_replaced_by_random_ones(tmp_path):
    with pytest.raises(R.MissingWeights, match="realism.inception_weights=.*does not exist"):
        R.build_extractor("inception", inception_weights=str(tmp_path / "pt_inception.pth"))
    with pytest.raises(R.MissingWeights, match="does not exist"):
        R.build_extractor("inception", inception_weights=None)
    with pytest.raises(R.MissingWeights, match="realism.oracle="):
        R.build_extractor("oracle", oracle=str(tmp_path / "nope"))


def test_inception_loads_a_state_dict_weights_only(tmp_path):
    torch.manual_seed(0)
    net = R.InceptionFeatures()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    loaded = R.build_extractor("inception", inception_weights=str(path))
    assert not loaded.training and all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():  # pool3 of any image size (shapes only: a CPU pass at 299×299 costs seconds)
        f = loaded.to("meta")(torch.zeros(2, 3, 16, 16, device="meta"))
    assert f.shape == (2, 2048)
    # a pickle that is not plain tensors is refused (weights_only), with the key in the message
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "module.pth")
    with pytest.raises(Exception, match="realism.inception_weights="):
        R.build_extractor("inception", inception_weights=str(tmp_path / "module.pth"))


def test_tensorflow_resize_keeps_an_image_of_the_same_size_and_a_constant():
    x = torch.rand(1, 3, 7, 7)
    assert torch.allclose(R.resize_like_tensorflow(x, 7), x)
    assert torch.allclose(R.resize_like_tensorflow(torch.full((1, 3, 5, 5), 3.0), 11), torch.full((1, 3, 11, 11), 3.0))


# --------------------------------------------------------------------------------------------- attributes
X = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 0], [1, 1, 0]])
CF = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0], [0, 1, 1]])
LABELS = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1], [0, 0, 1]])  # ρ(a1, q) = 0; a2 constant


def test_mnac_counts_changed_binarised_attributes():
    assert A.changed_attributes(X, CF).tolist() == [1, 2, 1, 2]
    assert A.mnac(X, CF) == 1.5
    assert A.mnac(X, CF, exclude=[0]) == 0.5
    assert A.binarise(np.array([[-0.1, 0.2]])).tolist() == [[0, 1]]
    assert A.binarise(np.array([[0.4, 0.6]]), threshold=0.5).tolist() == [[0, 1]]


def test_cd_by_hand_and_a_constant_change_counts_as_zero():
    # Δ_q = [1, 1, -1, -1], Δ_1 = [0, -1, 0, 0], Δ_2 = [0, 0, 0, 1]: ρ = -1/√3 each; label ρ: 0 and 0 (constant)
    assert A.correlation_difference(X, CF, query=0, train_labels=LABELS) == pytest.approx(2 / np.sqrt(3))
    # attribute 2 never changes (Δ_2 constant: ρ 0, not NaN) while its labels follow q exactly (ρ 1)
    cf2 = CF.copy()
    cf2[3, 2] = 0
    labels2 = LABELS.copy()
    labels2[:, 2] = LABELS[:, 0]
    cd = A.correlation_difference(X, cf2, query=0, train_labels=labels2)
    assert cd == pytest.approx(1 / np.sqrt(3) + 1.0)
    assert A.pearson([1, 1, 1], [0, 1, 2]) == 0.0
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=50), rng.normal(size=50)
    assert A.pearson(u, v) == pytest.approx(np.corrcoef(u, v)[0, 1])


def test_attribute_metrics_wrap_an_oracle_on_successful_counterfactuals():
    class Oracle(nn.Module):  # attribute a is on when the mean of channel a is positive
        def forward(self, x):
            return x.mean((2, 3))

    def img(bits):
        return torch.tensor([1.0 if b else -1.0 for b in bits]).view(3, 1, 1).expand(3, 4, 4)

    x = torch.stack([img(r) for r in X])
    x_cf = torch.stack([img(r) for r in CF])
    m = A.AttributeMetrics(Oracle(), query=0, train_labels=LABELS)
    per, level = m(x, x_cf, success=[True, True, True, False])
    assert np.allclose(per["mnac"][:3], [1, 2, 1]) and np.isnan(per["mnac"][3])
    assert level["mnac"] == pytest.approx(4 / 3)
    assert level["cd"] == pytest.approx(A.correlation_difference(X[:3], CF[:3], 0, LABELS))


# --------------------------------------------------------------------------------------------------- COUT
class RowReader(nn.Module):
    """Class 1's logit reads channel 0 of the top row: positive once 6 of its 10 pixels are bright."""

    def __init__(self, head="softmax"):
        super().__init__()
        self.head = head
        self.w = nn.Parameter(torch.zeros(()))  # a parameter, so that the model has a device

    def forward(self, x):
        z = 1000.0 * (((x[:, 0, 0, :] + 1) / 2).mean(1) - 0.55)
        return z.view(-1, 1) if self.head == "sigmoid" else torch.stack([torch.zeros_like(z), z], 1)


def row_pair(n=1):
    x = -torch.ones(n, 3, 10, 10)
    x_cf = x.clone()
    x_cf[:, :, 0, :] = 1.0  # the row the classifier reads: the 10 largest changes (6 each)
    x_cf[:, 1, 5:, :] += 0.1  # small changes elsewhere, ranked after the row, that the classifier ignores
    return x, x_cf


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_cout_of_a_step_by_hand(head):
    # 100 pixels in 50 steps: step k inserts 2k pixels, so the row is 6/10 bright at k = 3: p_target is 0 for
    # k = 0, 1, 2 and 1 from k = 3 to 50; trapezoids of width 1/50: AUC_t = (0.5 + 47)/50 = 0.95, AUC_s = 0.05
    model = RowReader(head)
    objective = ClassificationObjective(head=head)
    x, x_cf = row_pair(2)
    label, target = torch.tensor([0, 1]), torch.tensor([1, 0])  # the second input is misclassified
    p_t, p_s = insertion_curves(model, objective, x[:1], x_cf[:1], label[:1], target[:1])
    assert p_t.shape == (1, 51)
    assert np.allclose(p_t[0], [0, 0, 0] + [1] * 48, atol=1e-6) and np.allclose(p_s, 1 - p_t, atol=1e-6)
    assert auc(p_t)[0] == pytest.approx(0.95, abs=1e-6)
    values = cout(model, objective, x, x_cf, label, target)
    assert values[0] == pytest.approx(0.9, abs=1e-6)
    assert np.isnan(values[1])  # not correctly classified: no COUT
    # the way back (x_cf to x, class 1 to 0) is the same step: 4 of 10 still bright at k = 3
    back = cout(model, objective, x_cf[:1], x[:1], torch.tensor([1]), torch.tensor([0]))
    assert back[0] == pytest.approx(0.9, abs=1e-6)
    # a counterfactual that changes nothing the classifier reads never reaches the target
    still = cout(model, objective, x[:1], x[:1] + 0.01, torch.tensor([0]), torch.tensor([1]))
    assert still[0] == pytest.approx(-1.0, abs=1e-6)


def test_auc_of_a_constant_and_a_ramp():
    assert auc(np.ones(51)) == pytest.approx(1.0)
    assert auc(np.linspace(0, 1, 51)) == pytest.approx(0.5)


def test_the_insertion_path_runs_from_x_to_x_cf_in_batches():
    from cfx_cli.metrics.cout import insertion_ranks, insertion_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    objective = ClassificationObjective(mode="class", value=1)
    x, x_cf = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    source, target = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([1, 2, 0, 2, 0])
    p_t, _ = insertion_curves(model, objective, x, x_cf, source, target, batch_size=7)
    ranks = insertion_ranks(x, x_cf)
    assert torch.equal(insertion_step(x, x_cf, ranks, 0), x) and torch.equal(insertion_step(x, x_cf, ranks, 50), x_cf)
    with torch.no_grad():
        by_step = torch.stack([objective.probability(model(insertion_step(x, x_cf, ranks, k)), target)
                               for k in range(51)], 1)
    assert np.allclose(p_t, by_step.numpy(), atol=1e-6)
