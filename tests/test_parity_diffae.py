"""Diff-AE / Diff-AE-RE against the public code: DiffAE's DDIM inversion and reconstruction
(phizaz/diffae) and the regression paper's Diff-AE-RE loop (DevinTDHa/Diffusion-Counterfactuals-for-
Image-Regressors), on two differently seeded and configured random DiffAE checkpoints in the released
Lightning layout. The fixture (tests/fixtures/parity/diffae/diffae_parity.json says how it was made)
holds the networks, the official code's intermediate states, outputs, decisions and call counts.

Random networks make DDIM decoding chaotic: from the top of the grid (t = 900) x̂_0 = (z − √(1−ᾱ) ε̂)/√ᾱ
multiplies any difference by ≈ 60 before the clip, and the next steps amplify it again, so float32
rounding of the network (cfx's and DiffAE's UNets agree to ~1e-7) grows along a chain. Each step is
therefore compared on the official code's own input (teacher forcing) at float32 rounding, and whole
chains at a bound stated where they are compared.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cfx_cli.diffusion.sampler import DDIMSampler
from cfx_cli.errors import CfxError
from cfx_cli.methods.base import NoiseBank, SampleRNG
from cfx_cli.methods.diffae_cf import DiffAECounterfactual, DiffAERE
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.models.diffae import load_diffae
from cfx_cli.models.explained import ExplainedModel
from cfx_cli.objectives import ClassificationObjective, RegressionObjective

FIX = Path(__file__).parent / "fixtures" / "parity" / "diffae"
META = json.loads((FIX / "diffae_parity.json").read_text())
T = load_file(str(FIX / "diffae_parity.safetensors"))
TIGHT = dict(rtol=1e-4, atol=1e-5)  # float32 rounding

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(prefix):
    return {k.removeprefix(prefix): v for k, v in T.items() if k.startswith(prefix)}


def diffae(c, tmp_path):
    """The checkpoint as DiffAE's Lightning training writes it (model.* and ema_model.*), through cfx's loader."""
    state = tensors(f"{c}.state.")
    path = tmp_path / f"{c}.ckpt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in state.items()},
                               **{f"ema_model.{k}": v for k, v in state.items()}}, "global_step": 0}, path)
    return load_diffae(path, weights="ema", **META["models"][c]["flags"])


def counted(gen):
    meter = CostMeter()
    return Counted(gen, meter, "unet"), meter


@pytest.mark.parametrize("c", ["a", "b"])
def test_inversion_and_reconstruction_equal_diffae(c, tmp_path):
    """DiffAE's grids (ddimN: 0, 1000/N, ...), z_sem, every inversion and render step, x_T, the reconstruction,
    and the call counts (N inversion + T_render render calls per sample)."""
    spec, ref = META["models"][c], tensors(f"{c}.")
    gen, meter = counted(diffae(c, tmp_path))
    inv, ren = DDIMSampler(gen, f"ddim{spec['T_inv']}"), DDIMSampler(gen, f"ddim{spec['T_render']}")
    assert inv.schedule.timestep_map.tolist() == spec["grid_inv"]
    assert ren.schedule.timestep_map.tolist() == spec["grid_render"]
    x, n = ref["x"], len(ref["x"])
    with torch.no_grad():
        z_sem = gen.semantic(x)
        torch.testing.assert_close(z_sem, ref["z_sem"], rtol=0, atol=1e-5)
        z_sem = ref["z_sem"]
        # teacher forcing: each inversion step from DiffAE's own state (sample_t of ddim_reverse_sample_loop),
        # the last one from the top of the grid to alpha_bar = 0
        states = [x, *ref["inv_states"]]
        for k in range(spec["T_inv"]):
            torch.testing.assert_close(inv.invert(states[k], k + 1, cond=z_sem, t_from=k), states[k + 1], **TIGHT)
        torch.testing.assert_close(ref["inv_states"][-1], ref["x_T"], rtol=0, atol=0)
        # ... and each render step (ddim_sample_loop) from DiffAE's own state
        states = [ref["x_T"], *ref["render_states"]]
        for k in range(spec["T_render"]):
            t = spec["T_render"] - 1 - k
            torch.testing.assert_close(ren.denoise(states[k], t, t - 1, cond=z_sem), states[k + 1], **TIGHT)
        torch.testing.assert_close((ref["render_states"][-1] + 1) / 2, ref["reconstruction"], rtol=0, atol=0)

        # whole chains, as the method runs them, with its call count
        meter.start(n)
        x_T = inv.invert(x, inv.num_steps, cond=z_sem)
        assert meter.column("unet", "forward").tolist() == [spec["T_inv"]] * n == [len(spec["unet_calls_inversion"])] * n
        # the inversion's chain of T_inv steps (measured max |Δ| 1.2e-5 / 4.0e-5 for a / b, values up to 2.7)
        torch.testing.assert_close(x_T, ref["x_T"], rtol=1e-4, atol=1e-4)
        rec = ren.denoise(ref["x_T"], ren.num_steps - 1, -1, cond=z_sem)
        assert meter.column("unet", "forward").tolist() == [spec["T_inv"] + spec["T_render"]] * n
        # the render from DiffAE's x_T: T_render chained steps (measured max |Δ| 9.3e-5 / 4.3e-5 for a / b)
        torch.testing.assert_close(rec, ref["reconstruction"] * 2 - 1, rtol=0, atol=3e-4)
        # the whole inversion + render chain: x_T's rounding grows to 5.5e-4 / 3.8e-3 (a / b; a 1e-6 relative
        # perturbation of x_T moves these random decoders' output by up to 1e-2); the convention errors this test
        # guards against move it by 2.0 (cfx before the fix: x_T at the top of the grid instead of past it, or the
        # rounded grid 0, 111, ..., 999 instead of DiffAE's 0, 100, ..., 900)
        rec_own = ren.denoise(x_T, ren.num_steps - 1, -1, cond=z_sem)
        torch.testing.assert_close(rec_own, ref["reconstruction"] * 2 - 1, rtol=0, atol=1e-2)


class Regressor(nn.Module):
    """The fixture's random regressor of [0, 1] images (N x 1), as the official loop called it."""

    def __init__(self, size):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(4), nn.Linear(4 * (size // 4) ** 2, 1)

    def forward(self, x):
        return self.fc(self.pool(torch.nn.functional.silu(self.conv(x))).flatten(1))


class Classifier(nn.Module):
    """The fixture's random binary classifier: logits [0, a (r(x) − c)] of the regressor r."""

    def __init__(self, reg, a, c):
        super().__init__()
        self.reg, self.a, self.c = reg, a, c

    def forward(self, x):
        r = self.reg(x)
        return torch.cat([torch.zeros_like(r), self.a * (r - self.c)], 1)


class Recorded(nn.Module):
    """Keeps each call's output with the rows (samples) it was made for."""

    def __init__(self, model, meter):
        super().__init__()
        self.model, self.meter, self.calls = model, meter, []
        self.task, self.head, self.num_classes = model.task, model.head, model.num_classes

    def forward(self, x):
        out = self.model(x)
        self.calls.append((self.meter.active.clone(), out.detach().clone()))
        return out


@pytest.mark.parametrize("key", ["a_regression", "b_regression", "a_classifier"])
def test_diffae_re_loop_equals_the_public_code(key, tmp_path, monkeypatch):
    """The regression paper's DiffeoCF.adv_attack_dae_batch (and, for cfx's classifier variant, the same loop with
    cross-entropy): z after the first Adam step, the explained model's output at every render, the counterfactual,
    the reconstruction, success, the updates and the UNet / model calls of every sample."""
    loop = META["loops"][key]
    spec, ref = loop["spec"], tensors(f"{key}.")
    mspec = META["models"][spec["model"]]
    gen, meter = counted(diffae(spec["model"], tmp_path))
    n, size = len(T[f"{spec['model']}.x"]), mspec["flags"]["image_size"]
    reg = Regressor(size)
    reg.load_state_dict(tensors(f"{key}.regressor."))
    if spec["task"] == "regression":
        explained = ExplainedModel(reg, "regression", normalize="zero_one")
        objective = RegressionObjective(mode="absolute", value=0.0, tolerance=spec["tol"])
        target, method_cls = torch.tensor(spec["targets"]), DiffAERE
    else:
        explained = ExplainedModel(Classifier(reg, spec["a"], spec["c"]), "classification", normalize="zero_one",
                                   num_classes=2)
        objective = ClassificationObjective(mode="flip", head="softmax", num_outputs=2)
        target, method_cls = torch.tensor(spec["targets"]), DiffAECounterfactual
    model = Recorded(explained, meter)
    sampler = DDIMSampler(gen, f"ddim{spec['T_render']}", eta=0.0)
    num_steps = spec["num_steps"]
    # the public code's num_steps renders = num_steps − 1 judged updates; its batch-mean loss (batch_mean_loss)
    method = method_cls(sampler, Counted(model, meter, "model"), objective, lr=spec["lr"], iterations=num_steps - 1,
                        lambda_z=spec["lambda"], inversion_steps=f"ddim{spec['T_inv']}", batch_mean_loss=True)

    first = {}
    adam_step = torch.optim.Adam.step

    def step(self, *a, **k):  # z of each sample's optimiser after its first step
        out = adam_step(self, *a, **k)
        first.setdefault(id(self), self.param_groups[0]["params"][0].detach().clone())
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    meter.start(n)
    # DiffAE's DDIM sampler draws randn_like at every render step and multiplies it by sigma = 0 (eta = 0):
    # the fixture records how many (loop["draws"]); cfx draws none, and an empty bank makes any draw an error
    res = method.explain(T[f"{spec['model']}.x"], target, SampleRNG(0, range(n), meter=meter, source=NoiseBank([])))
    cost = meter.stop()

    success = torch.tensor(loop["success"])
    with torch.no_grad():
        assert objective.success(explained(res.x_cf), target).tolist() == loop["success"]
    # updates: a success at render r took r updates; a failure took num_steps − 1 that were rendered (the public
    # code's Adam counts one more, after its last render, never seen)
    adam = torch.tensor(loop["adam_steps"])
    updates = torch.where(success, adam, adam - 1)
    assert res.info["iterations"].long().tolist() == updates.tolist()
    assert torch.equal(torch.where(success, adam + 1, torch.full_like(adam, num_steps)), updates + 1)  # renders

    # z after the first Adam step (rows without an update keep z_sem)
    z_first = ref["z_first"].clone()
    got = list(first.values())
    assert len(got) == int((updates > 0).sum())
    rows = (updates > 0).nonzero().flatten().tolist()
    torch.testing.assert_close(torch.cat(got), z_first[rows], **TIGHT)

    # the explained model's output at every render of every sample still running (the fixture: whole batches;
    # measured max |Δ| 1.1e-5 / 3.5e-5 for the regressors, 5.4e-4 for the classifier's logits, 50 × a regressor)
    renders = torch.zeros(n, dtype=torch.long)
    for rows_, out in model.calls:
        for row, o in zip(rows_.tolist(), out):
            want = ref["trace"][renders[row], row]
            if spec["task"] == "regression":
                want = want.squeeze(-1)
            torch.testing.assert_close(o, want, rtol=0, atol=2e-4 * spec.get("a", 1.0))  # logits: a × the regressor
            renders[row] += 1
    assert renders.tolist() == (updates + 1).tolist()

    # images: the counterfactual and the reconstruction, chains of renders from cfx's own x_T (measured max |Δ|
    # 1.0e-3 / 2.9e-3 / 1.0e-3 for a_regression / b_regression / a_classifier; see the module docstring)
    torch.testing.assert_close(res.extras["reconstruction"], ref["reconstruction"] * 2 - 1, rtol=0, atol=1e-2)
    torch.testing.assert_close(res.x_cf, ref["x_prime"] * 2 - 1, rtol=0, atol=1e-2)

    # calls per sample: inversion + reconstruction + T_render per render; the model once per render, a backward per
    # update. The public code renders the whole batch every time (finished samples too: the same images, more cost)
    t_inv, t_r = spec["T_inv"], spec["T_render"]
    assert cost["unet"]["forward"].tolist() == (t_inv + t_r + (updates + 1) * t_r).tolist()
    assert len(loop["unet_calls"]) == t_inv + t_r + len(loop["model_calls"]) * t_r
    assert set(loop["unet_calls"]) == set(loop["model_calls"]) == {n}
    assert cost["model"]["forward"].tolist() == (updates + 1).tolist()
    # one backward per render after which some sample goes on: the batched backward runs through the rows that
    # stop at that render too (their loss weighted 0), as the public code's does through all rows
    n_renders = updates + 1
    backward = [sum(bool((n_renders > r + 1).any()) for r in range(int(k))) for k in n_renders]
    assert cost["model"]["backward"].tolist() == backward
    assert (cost["model"]["backward"] >= updates).all()


def test_configs_use_diffae_grids_and_inversion_steps_takes_any_grid_spelling(compose, tmp_path):
    """The method and experiment configs name DiffAE's grids (ddim20 inversion = T_eval, ddim10 render =
    BACKWARD_T) and the public code's 200 renders; inversion_steps takes what sampler.steps takes."""
    # (the synthetic default job's conf/tuning* files set their own lr and iterations)
    for overrides in (["method=diffae_re", "diffusion=diffae_ffhq256"], ["method=diffae", "diffusion=diffae_ffhq256"],
                      ["experiment=diffae_re_celebahq_age"]):
        cfg = compose(["device=cpu", *overrides])
        assert (cfg.method.inversion_steps, cfg.sampler.steps, cfg.method.iterations) == ("ddim20", "ddim10", 199)
    assert compose(["device=cpu", "experiment=diffae_re_celebahq_age"]).method.batch_mean_loss is True
    gen = diffae("b", tmp_path)
    sampler = DDIMSampler(gen, "ddim10")
    assert sampler.schedule.timestep_map.tolist() == list(range(0, 1000, 100))
    objective = RegressionObjective(mode="absolute", value=0.5)
    for spelling, grid in (("ddim20", list(range(0, 1000, 50))), (20, None), ("20", None), ("10,5", None)):
        method = DiffAERE(sampler, nn.Identity(), objective, inversion_steps=spelling)
        assert method.inverter.num_steps == (15 if spelling == "10,5" else 20)
        if grid:
            assert method.inverter.schedule.timestep_map.tolist() == grid
    for bad in ("ddim999", "every20", 0, 1001, 2.5):
        with pytest.raises(CfxError, match="method.inversion_steps="):
            DiffAERE(sampler, nn.Identity(), objective, inversion_steps=bad)
