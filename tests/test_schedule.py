"""The noise-schedule math against diffusers' DDPMScheduler and the ADM reference fixture."""
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from cfx_cli.diffusion.schedule import NoiseSchedule, space_timesteps

# Reference data made with guided-diffusion's own code (random weights), kept in the repo (tests/fixtures/adm).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adm"


def load_fixture(name: str):
    return torch.load(FIXTURES / name, weights_only=True)


def test_tables_and_forward_process_match_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    s = NoiseSchedule.from_config("linear", 1000)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-6, atol=1e-7)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_posterior_step_matches_diffusers(variance):
    """Deterministic part (mean) and variance of one reverse step equal DDPMScheduler.step's."""
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                        variance_type=variance, prediction_type="epsilon")
    s = NoiseSchedule.from_config("linear", 1000)
    x_t, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for t in (999, 400, 37, 1):
        out = s.p_mean_variance(eps, x_t, torch.tensor([t, t]), variance=variance, clip=True)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
        step = ref.step(eps, t, x_t, generator=g).prev_sample
        ours = out["mean"] + (0.5 * out["log_variance"]).exp() * z
        torch.testing.assert_close(out["pred_xstart"], ref.step(eps, t, x_t).pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours, step, atol=1e-4, rtol=1e-4)


def test_respaced_tables_follow_guided_diffusion_convention():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10,10") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49] + \
        [50, 55, 61, 66, 72, 77, 83, 88, 94, 99]
    s = NoiseSchedule.from_config("linear", 1000)
    r = s.respace(200)
    # ᾱ on the kept grid is unchanged by respacing: only β is recomputed.
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[r.timestep_map])


def test_adm_reference_p_mean_variance():
    """Respacing 200 of T=500 and learned-range variance reproduce guided-diffusion's outputs."""
    ref = load_fixture("tiny_adm_reference.pt")
    s = NoiseSchedule.from_config("linear", 500).respace("200")
    assert torch.equal(s.timestep_map, ref["timestep_map"])
    torch.testing.assert_close(s.alphas_cumprod, ref["alphas_cumprod_respaced"])
    x_t = s.q_sample(ref["x"], ref["t_respaced"], ref["noise"])
    torch.testing.assert_close(x_t, ref["x_t"], atol=1e-5, rtol=0)
    out = s.p_mean_variance(ref["model_output_at_original_t"], ref["x_t"], ref["t_respaced"],
                            variance="learned_range", clip=True)
    for k in ("mean", "log_variance", "pred_xstart"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=0)
