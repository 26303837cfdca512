"""DiME and FastDiME on the shipped models, built from composed configs exactly as `cfx run` builds
them: they flip the classifier, reach regression targets, reveal the biased classifier's shortcut,
count their cost as the papers do, and give the same image whatever the batch."""
import numpy as np
import pytest
import torch

from cfx_cli.job.build import build
from cfx_cli.methods.base import SampleRNG
from cfx_cli.metrics.sample import outcomes

BUILT = {}


@pytest.fixture
def parts(compose):
    """The job's parts for some overrides (cached: building loads the zoo models)."""

    def _parts(*overrides):
        key = tuple(overrides)
        if key not in BUILT:
            cfg = compose(["device=cpu", *overrides])
            BUILT[key] = (cfg, build(cfg, torch.device("cpu")))
        return BUILT[key]

    return _parts


class Explained:
    """A method's result, its cost per sample from the counting wrappers, and success on the final image."""

    def __init__(self, p, x, indices, seed=0):
        model, objective, meter = p["model"], p["objective"], p["meter"]
        with torch.no_grad():
            self.target = objective.target(model(x))
            meter.start(len(x))
            result = p["method"].explain(x, self.target, SampleRNG(seed, indices, meter=meter))
            cost = meter.stop()
            self.success = objective.success(model(result.x_cf), self.target)
        self.x_cf, self.extras, self.info = result.x_cf, result.extras, result.info
        self.unet, self.model = cost["unet"], cost["model"]


def per_strength(res, tried=1):
    """UNet calls (forward + backward) each sample's counterfactual took per strength tried, as counted."""
    return (res.unet["forward"] + res.unet["backward"]).float() / tried


def images(p, n, start=0):
    batch = p["dataset"].batch(list(range(start, start + n)))
    return batch["x"], batch["index"]


def test_fastdime_flips_the_shipped_classifier(parts):
    cfg, p = parts()  # the default job: FastDiME tuned for the synthetic DDPM
    x, idx = images(p, 8)
    res = Explained(p, x, idx)
    assert res.success.float().mean() >= 0.75
    assert (res.x_cf - x).abs().mean() / 2 < 0.1  # small edits
    # One UNet call per guided step and scale tried, never differentiated; one explained-model
    # forward and backward per step, plus a forward to judge each scale.
    tau, scales = cfg.method.tau, torch.tensor(list(cfg.method.scales))
    tried = (res.info["scale"].unsqueeze(1) >= scales).sum(1)
    assert torch.equal(res.unet["forward"], tau * tried) and not res.unet["backward"].any()
    assert torch.equal(res.model["forward"], (tau + 1) * tried)
    assert torch.equal(res.model["backward"], tau * tried)
    assert (per_strength(res, tried) == p["method"].unet_calls()).all()  # what the progress bar expects


def test_dime_flips_with_its_nested_chain_cost(parts):
    cfg, p = parts("method=dime")
    x, idx = images(p, 4)
    res = Explained(p, x, idx)
    assert res.success.float().mean() >= 0.75
    tau = cfg.method.tau
    per_scale = tau + sum(range(1, tau))  # τ guided calls + the unguided chains (O(τ²))
    tried = (res.info["scale"].unsqueeze(1) >= torch.tensor(list(cfg.method.scales))).sum(1)
    assert torch.equal(res.unet["forward"], per_scale * tried) and not res.unet["backward"].any()
    assert (per_strength(res, tried) == p["method"].unet_calls()).all()


@pytest.mark.parametrize("variant,passes", [("nomask", 1), ("2", 2), ("2+", 2)])
def test_fastdime_variants(parts, variant, passes):
    cfg, p = parts(f"method.variant={variant}", "sampler.steps=100", "method.tau=30", "method.scales=[10.0]")
    x, idx = images(p, 4)
    res = Explained(p, x, idx)
    assert torch.equal(res.unet["forward"], torch.full((4,), 30 * passes))
    assert (per_strength(res) == p["method"].unet_calls()).all()
    if variant == "nomask":
        assert "mask" not in res.extras
    else:  # the fixed mask of the second pass confines the edit: outside it, the output is the input
        m = res.extras["mask"]
        assert m.shape == (4, 1, 32, 32) and 0 < m.mean() < 1
        assert ((res.x_cf - x).abs() * (1 - m)).max() < 1e-5


def test_fastdime_reveals_the_biased_classifiers_shortcut(parts):
    """The biased classifier reads the background only: its counterfactuals change the
    background (as the oracle sees it), the clean classifier's do not.

    The default mask threshold (0.4, conf/tuning/fastdime_synthetic_ddpm.yaml) puts back backgrounds that the
    DDPM's prior redraws, and with them the background edit this classifier asks for: hunting a background
    shortcut needs the paper's looser mask (0.15), for both classifiers alike."""
    changed = {}
    for name in ("synthetic_shape", "synthetic_shape_biased"):
        _, p = parts(f"classifier={name}", "method.mask_threshold=0.15")
        x, idx = images(p, 8)
        res = Explained(p, x, idx)
        assert res.success.float().mean() >= 0.75, name
        read = p["oracle"].read
        before, after = read(x), read(res.x_cf)
        changed[name] = float((after["bg_colour"] != before["bg_colour"]).mean())
        if name == "synthetic_shape_biased":
            # the originals it misreads (the oracle sees the target shape already): a flip there is "corrected",
            # and it is the shortcut itself: the background changed, the shape kept
            target_shape = np.array([p["dataset"].world.shape_ids[int(v)] for v in res.target])
            was, confirmed = before["shape"] == target_shape, after["shape"] == target_shape
            kind = outcomes(res.success.numpy(), confirmed.astype(float), was.astype(float))
            corrected = kind == "corrected"
            assert corrected.sum() >= 2, kind
            assert (after["bg_colour"] != before["bg_colour"])[corrected].all()
            assert (after["shape"] == before["shape"])[corrected].all()
    assert changed["synthetic_shape_biased"] >= 0.5 and changed["synthetic_shape"] <= 0.25, changed


def test_same_image_whatever_the_batch(parts):
    """Per-sample generators: sample 5 alone equals sample 5 inside a batch, up to float rounding
    (convolution kernels differ with the batch size; ten guided steps grow that to ~1e-3, whereas
    other noise would change pixels by ~1)."""
    _, p = parts("sampler.steps=50", "method.tau=10", "method.scales=[10.0]")
    x, idx = images(p, 4, start=4)
    full = Explained(p, x, idx, seed=7)
    alone = Explained(p, x[1:2], idx[1:2], seed=7)
    diff = (full.x_cf[1:2] - alone.x_cf).abs()
    assert diff.max() < 1e-2 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    other = Explained(p, x[1:2], idx[1:2], seed=8)
    assert (other.x_cf - alone.x_cf).abs().max() > 0.1  # another seed: another image


def test_fastdime_moves_the_regressor_to_its_target(parts):
    _, p = parts("regressor=synthetic_size", "target=absolute", "target.value=0.8")
    x, idx = images(p, 8)
    with torch.no_grad():
        before = (p["model"](x) - 0.8).abs()
    res = Explained(p, x, idx)
    with torch.no_grad():
        after = (p["model"](res.x_cf) - 0.8).abs()
    assert torch.allclose(res.target, torch.full_like(res.target, 0.8))
    assert after.mean() < before.mean() / 2
    assert res.success.float().mean() >= 0.5


def test_ace_flips_the_robust_classifier_with_a_local_mask(parts):
    """ACE (tuned: tau 5 of 50, 50 PGD iterations through the filter) on the adversarially trained
    classifier, whose gradients point at the shape: most images get a real shape change (the oracle
    agrees); outside each mask the counterfactual is the original, exactly (measured: 5 of 8)."""
    cfg, p = parts("method=ace", "classifier=synthetic_shape_robust")
    x, idx = images(p, 8)
    res = Explained(p, x, idx)
    assert res.success.float().mean() >= 0.6
    read = p["oracle"].read
    flipped = torch.as_tensor(read(res.x_cf)["shape"] != read(x)["shape"])
    assert flipped[res.success].float().mean() >= 0.75  # shape counterfactuals, not adversarial noise
    m = res.extras["mask"]
    assert m.shape == (8, 1, 32, 32) and (m.flatten(1).mean(1) < 0.9).sum() >= 4  # around the object
    assert ((res.x_cf - x).abs() * (1 - m)).max() == 0  # the background outside the mask is untouched
    assert res.extras["pre_explanation"].shape == x.shape
    # Cost: τ UNet forwards + backwards per PGD iteration (all run: no early stop for classifiers),
    # τ forwards for the refinement; the classifier differentiated once per iteration
    tau, its = cfg.method.tau, cfg.method.iterations
    assert torch.equal(res.unet["forward"], torch.full((8,), tau * its + tau))
    assert torch.equal(res.unet["backward"], torch.full((8,), tau * its))
    assert torch.equal(res.model["backward"], torch.full((8,), its))
    assert (per_strength(res) == p["method"].unet_calls()).all()


def test_ac_re_moves_every_prediction_toward_its_target_and_stops(parts):
    """AC-RE: ACE with (f(x) − y*)² and the paper's stop once |f(F_τ(x′)) − y*| ≤ tolerance."""
    _, p = parts("method=ace", "regressor=synthetic_size", "method.iterations=20")
    x, idx = images(p, 4)
    with torch.no_grad():
        before = (p["model"](x) - p["objective"].target(p["model"](x))).abs()
    res = Explained(p, x, idx)
    with torch.no_grad():
        after = (p["model"](res.x_cf) - res.target).abs()
    assert (after < before).all(), (before, after)
    # a loose tolerance: samples stop as soon as their filtered prediction is within it, and only the
    # iterations they ran are charged (τ UNet backward passes each)
    _, q = parts("method=ace", "regressor=synthetic_size", "method.iterations=20", "target=absolute",
                 "target.value=0.5", "target.tolerance=0.2")
    loose = Explained(q, x, idx)
    its = loose.info["pgd_iterations"].long()
    assert (its < 20).any() and (its >= 1).all()
    assert torch.equal(loose.unet["backward"], 5 * its)
    assert (per_strength(loose) <= q["method"].unet_calls()).all()  # an upper bound where samples stop early
    assert (per_strength(loose) < q["method"].unet_calls()).any()


def test_dvce_flips_and_the_cone_changes_the_counterfactual(parts):
    """DVCE (tuned: lambda_c 0.5, lambda_d 0.3, late start at 99 of 200) flips the clean classifier with
    and without the cone; the cone (30°, towards the PGD-trained model) gives other images, and only it
    calls the robust model (measured: 8 of 8 flipped either way)."""
    results = {}
    for cone in ("30", "null"):
        _, p = parts("method=dvce", f"method.cone_angle={cone}", "method.augmentations=4")
        x, idx = images(p, 4)
        res = Explained(p, x, idx)
        assert res.success.float().mean() >= 0.75, cone
        assert (res.x_cf - x).abs().mean() / 2 < 0.05  # small edits
        results[cone] = res
    cone, plain = results["30"], results["null"]
    assert (cone.x_cf - plain.x_cf).abs().mean() > 1e-3
    assert torch.isfinite(cone.info["cone_angle_mean"]).all() and torch.isnan(plain.info["cone_angle_mean"]).all()
    # 99 guided steps: one UNet forward + two (three with the cone) backward passes each, one more forward
    assert torch.equal(plain.unet["forward"], torch.full((4,), 100))
    assert torch.equal(plain.unet["backward"], torch.full((4,), 2 * 99))
    assert torch.equal(cone.unet["backward"], torch.full((4,), 3 * 99))
    for key, res in (("null", plain), ("30", cone)):
        _, p = parts("method=dvce", f"method.cone_angle={key}", "method.augmentations=4")
        assert (per_strength(res) == p["method"].unet_calls()).all(), key


def test_ldce_flips_and_consensus_drops_disagreeing_scores(parts):
    """LDCE on the shipped latent diffusion model (tuned: conf/tuning/ldce_synthetic_ldm.yaml) flips the clean
    classifier with consensus guidance and without it (the ablation); consensus keeps part of the latent
    positions' classifier score and gives other images. Cost per step: ε_u and ε_c in one batched call,
    two backward passes (classifier, distance), one decode with those two backward passes."""
    results = {}
    for consensus in ("true", "false"):
        cfg, p = parts("method=ldce", f"method.consensus={consensus}")
        x, idx = images(p, 4)
        res = Explained(p, x, idx)
        assert res.success.float().mean() >= 0.75, consensus
        assert (res.x_cf - x).abs().mean() / 2 < 0.1  # small edits
        results[consensus] = (cfg, res)
    (cfg, on), (_, off) = results["true"], results["false"]
    assert ((on.info["consensus_kept"] > 0) & (on.info["consensus_kept"] < 1)).all()
    assert torch.equal(off.info["consensus_kept"], torch.ones(4))
    assert (on.x_cf - off.x_cf).abs().mean() > 1e-3
    steps = int(cfg.method.strength * grid_steps(cfg))
    assert torch.equal(on.unet["forward"], torch.full((4,), 2 * steps))
    assert torch.equal(on.unet["backward"], torch.full((4,), 2 * 2 * steps))
    assert (per_strength(on) == parts("method=ldce", "method.consensus=true")[1]["method"].unet_calls()).all()


def grid_steps(cfg):
    from cfx_cli.diffusion.schedule import space_timesteps

    return len(space_timesteps(1000, cfg.sampler.steps))


def test_diffae_re_moves_the_regressor_to_its_target(parts):
    """Diff-AE-RE (Adam on the semantic code, x_T fixed) moves every size prediction toward its target, and the
    reconstruction from the unchanged code is close to the input (the heat-map's reference)."""
    cfg, p = parts("method=diffae_re", "method.iterations=25")
    x, idx = images(p, 3)
    res = Explained(p, x, idx)
    before = (p["model"](x) - res.target).abs()
    after = (p["model"](res.x_cf) - res.target).abs()
    assert (after < before).all()
    assert (res.info["reconstruction_l1"] < 0.05).all()
    assert (res.info["iterations"] <= cfg.method.iterations).all()
    assert (per_strength(res) <= p["method"].unet_calls()).all()  # an upper bound: samples stop at success
