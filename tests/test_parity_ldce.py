"""LDCE against the official code (lmb-freiburg/ldce): the same tiny class-conditional LDM, classifier, inputs
and noise give the same counterfactual, intermediate states, success and call counts.

Fixtures (tests/fixtures/parity/ldce/, how they were made: ldce_official.json):
``consensus.safetensors`` (``guidance=projected``, ``cone_projection_type=zero_binning``: the consensus
guidance of the published ImageNet configs), ``no_consensus.safetensors`` (the classifier score
unprojected, the paper's ablation) and ``free.safetensors`` (``guidance=free``, what the published
CelebA-HQ config runs: plain classifier-free guidance; cfx's ``method.free_guidance=true``). Each holds the official run's inputs (images in [0, 1], targets), the classifier's
weights, every random draw in order (``noise.NNN.randn``), the encoded latent, the noised latent, per step
the latent after the step, ε_u, ε_c, the guided ε, the decoded clean estimate and (consensus) the kept
positions, the counterfactual in [0, 1], its logits and success.

The LDM: ``ldm_tiny_parity``'s VQ-f4 (tests/test_ldm_checkpoint.py), a two-level UNet (a well-conditioned
one: see ldce_official.json) and a 1001-row class embedder (the official ``generate_samples`` hard-codes
class 1000 as the unconditional one); its weights are made again here by ``ldm_weights`` from the
official state dict's layout (checked against the fixture's fingerprint) and written as a CompVis
Lightning checkpoint, which cfx loads through ``diffusion=ldm_cin256`` as ``cfx run`` does.
"""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors import safe_open
from torch import nn

from cfx_cli.methods.base import NoiseBank, SampleRNG
from cfx_cli.models.ldm_checkpoint import CIN256_V2_UNET_CONFIG
from test_ldm_checkpoint import SMALL_VQ, ldm_weights, schedule_buffers, write_lightning_ckpt

PARITY = Path(__file__).parent / "fixtures" / "parity" / "ldce"
INFO = json.loads((PARITY / "ldce_official.json").read_text())
SETTINGS = INFO["settings"]
# The official run's UNet (ldm openaimodel: model_channels 64, channel_mult 1,2, one res block, attention at
# ds 2, one head, context 32) as diffusers configures it (create_unet_diffusers_config_from_ldm).
TINY_UNET = {**CIN256_V2_UNET_CONFIG, "sample_size": 8, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [64, 128],
             "layers_per_block": 1, "cross_attention_dim": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


class ParityClassifier(nn.Module):
    """The official run's explained model (images in [0, 1]: its ``classifier_wrapper=True`` path) on cfx's
    [-1, 1] images."""

    task, head, num_classes = "classification", "softmax", 10

    def __init__(self, state: dict):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU(),
                                 nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
        self.load_state_dict(state)
        self.eval().requires_grad_(False)

    def forward(self, x):
        return self.net((x + 1) / 2)


def load(name: str) -> dict:
    with safe_open(str(PARITY / f"{name}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    layout = INFO["model"]["layout"]
    weights = ldm_weights(layout, 0)
    sums = torch.stack([weights[k].double().sum() for k in layout])
    ref = load("consensus")["weights_fingerprint"]
    assert torch.allclose(sums, ref, rtol=1e-6, atol=1e-6), "the LDM's weights differ from the official run's"
    path = tmp_path_factory.mktemp("ldce_parity") / "cin_tiny.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        write_lightning_ckpt(path, {**schedule_buffers(), **weights}, mp)
    return path


def explain(compose, checkpoint, ref, variant: str, set_alpha_to_one: bool = False):
    """cfx's LDCE built as `cfx run` builds it, replaying the official run's noise."""
    try:  # the job builder (cfx_cli.job.build; cfx_cli.run before the command layer's split)
        from cfx_cli.job.build import build
    except ImportError:
        from cfx_cli.job.build import build

    cfg = compose(["device=cpu", "method=ldce", "diffusion=ldm_cin256", f"diffusion.path={checkpoint}",
                   "diffusion.image_size=32",  # the tiny model of the family decodes 32×32 (cin256-v2: 256)
                   f"sampler.steps=ldm{SETTINGS['ddim_steps']}", f"method.strength={SETTINGS['strength']}",
                   f"method.lambda_c={SETTINGS['classifier_lambda']}", f"method.lambda_d={SETTINGS['dist_lambda']}",
                   f"method.angle={SETTINGS['deg_cone_projection']}", f"method.scale={SETTINGS['scale']}",
                   f"method.consensus={str(variant == 'consensus').lower()}",
                   f"method.free_guidance={str(variant == 'free').lower()}",
                   f"method.set_alpha_to_one={str(set_alpha_to_one).lower()}"])
    with open_dict(cfg):
        cfg.diffusion.unet_config, cfg.diffusion.vq_config = dict(TINY_UNET), dict(SMALL_VQ)
    classifier = ParityClassifier({k[len("classifier."):]: v for k, v in ref.items() if k.startswith("classifier.")})
    parts = build(cfg, torch.device("cpu"), model=classifier)
    x = 2.0 * ref["image01"] - 1  # the official _unmap_img
    target = ref["target"]
    # The official DDIM step draws noise_like(x) at every step and multiplies it by sigma = 0 (eta = 0);
    # cfx draws no noise for a deterministic step: only the first draw (the q_sample noise) is replayed.
    draws = [ref[k] for k in sorted(k for k in ref if k.startswith("noise."))]
    bank = NoiseBank(draws[:1])
    meter = parts["meter"]
    method, steps = parts["method"], []
    step = method.ddim_step

    def recording_step(z, t, eps):
        out = step(z, t, eps)
        steps.append((z.detach(), eps.detach(), out.detach()))
        return out

    method.ddim_step = recording_step
    meter.start(len(x))
    result = method.explain(x, target, SampleRNG(0, range(len(x)), meter=meter, source=bank))
    cost = meter.stop()
    assert bank.remaining == 0
    with torch.no_grad():
        success = parts["objective"].success(parts["model"](result.x_cf), target)
    return result, steps, cost, success


@pytest.mark.parametrize("variant", ["consensus", "no_consensus", "free"])
def test_ldce_equals_the_official_code(compose, checkpoint, variant):
    ref = load(variant)
    result, steps, cost, success = explain(compose, checkpoint, ref, variant)
    t_enc = INFO["results"][variant]["t_enc"]
    assert len(steps) == t_enc
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(steps[0][0], ref["z_enc"], **close)  # the noised latent
    for i, (z_in, eps, z_out) in enumerate(steps):
        torch.testing.assert_close(eps, ref["eps_guided"][i], **close, msg=f"guided eps at step {i}")
        torch.testing.assert_close(z_out, ref["z_steps"][i], **close, msg=f"latent after step {i}")
    torch.testing.assert_close((result.x_cf + 1) / 2, ref["x_cf01"], **close)
    assert torch.equal(success, ref["success"])
    if variant == "consensus":  # the share of latent positions whose classifier score was kept, per sample
        kept = ref["consensus_mask"].flatten(2).mean(2).mean(0)
        torch.testing.assert_close(result.info["consensus_kept"], kept, rtol=0, atol=1e-6)
    elif variant == "no_consensus":
        assert torch.equal(result.info["consensus_kept"], torch.ones(3))
    # Calls per sample. UNet: one batched call on [z, z] per step (ε_u, ε_c: 2 evaluations), two backward
    # passes through it (distance, classifier); decoder: one differentiable decode per step (two backward
    # passes) and the final decode; classifier: one forward and one backward per step (the official run's
    # judgement of the counterfactual is outside the method, as cfx's runner's).
    official = INFO["results"][variant]["cost"]
    if variant == "free":  # plain classifier-free guidance: one batched UNet call a step, no gradient; the
        # official code also decodes x̂_0 at every step and discards it (t_enc more decoder calls), cfx does not
        assert official["unet"]["forward_per_sample"] == 2 * t_enc and official["unet"]["backward_per_sample"] == 0
        assert official["decoder"]["forward_per_sample"] == t_enc + 1
        assert official["classifier"]["forward_per_sample_in_method"] == 0
        assert torch.equal(cost["unet"]["forward"], torch.full((3,), 2 * t_enc)) and not cost["unet"]["backward"].any()
        assert torch.equal(cost["decoder"]["forward"], torch.ones(3, dtype=torch.long))
        assert "model" not in cost or not cost["model"]["forward"].any()
        return
    expected = {("unet", "forward"): official["unet"]["forward_per_sample"],
                ("unet", "backward"): official["unet"]["backward_per_sample"],
                ("decoder", "forward"): official["decoder"]["forward_per_sample"],
                ("decoder", "backward"): official["decoder"]["backward_per_sample"],
                ("model", "forward"): official["classifier"]["forward_per_sample_in_method"],
                ("model", "backward"): official["classifier"]["backward_per_sample"]}
    assert expected == {("unet", "forward"): 2 * t_enc, ("unet", "backward"): 4 * t_enc,
                        ("decoder", "forward"): t_enc + 1, ("decoder", "backward"): 2 * t_enc,
                        ("model", "forward"): t_enc, ("model", "backward"): t_enc}
    for (role, kind), n in expected.items():
        assert torch.equal(cost[role][kind], torch.full((3,), n)), (role, kind)


def test_ldce_default_last_step_differs_from_the_official_code(compose, checkpoint):
    """cfx's default DDIM ends at ᾱ = 1 (the clean latent); the official code (LDM's DDIMSampler) ends at ᾱ of
    timestep 0 = 1 − β_0: the steps before the last agree, the last one does not."""
    ref = load("consensus")
    _, steps, _, _ = explain(compose, checkpoint, ref, "consensus", set_alpha_to_one=True)
    torch.testing.assert_close(steps[-2][2], ref["z_steps"][-2], rtol=1e-4, atol=1e-5)
    assert (steps[-1][2] - ref["z_steps"][-1]).abs().max() > 1e-2
