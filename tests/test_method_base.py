"""What every method shares (methods/base.py): the noise-source hook (a SampleRNG replaying a recorded bank
of whole-batch draws, row by row) and the difference mask."""
import pytest
import torch

from cfx_cli.methods.base import NoiseBank, SampleRNG


def test_bank_replays_recorded_draws_in_order_and_by_row():
    first, second = torch.arange(6.).reshape(3, 2), torch.arange(6.).reshape(3, 2) + 10
    rng = SampleRNG(0, [4, 5, 6], source=NoiseBank([first, second]))
    assert torch.equal(rng.randn((2,)), first)
    with rng.subset(torch.tensor([False, True, True])) as sub:  # samples 1 and 2 of the batch
        assert torch.equal(sub.randn((2,)), torch.tensor([[12., 13.], [14., 15.]]))


def test_bank_refuses_a_draw_it_did_not_record():
    rng = SampleRNG(0, [0, 1], source=NoiseBank([torch.zeros(2, 3)]))
    with pytest.raises(RuntimeError, match="draw 0 is randn"):
        rng.randn((4,))
    rng.randn((3,))
    with pytest.raises(RuntimeError, match="exhausted"):
        rng.randn((3,))
    with pytest.raises(RuntimeError, match="is randn"):
        SampleRNG(0, [0, 1], source=NoiseBank([torch.zeros(2, 3)])).rand((3,))


def test_without_a_bank_each_sample_draws_from_its_own_seeded_generator():
    g = torch.Generator().manual_seed((7 * 1_000_003 + 3 * 7_919 + 12_345) % (2**63 - 1))
    expected = torch.randn(5, generator=g)
    assert torch.equal(SampleRNG(7, [9, 3]).randn((5,))[1], expected)


def test_ace_mask_keeps_pixels_at_the_threshold_fastdime_mask_does_not():
    from cfx_cli.methods.base import difference_mask
    x = torch.zeros(1, 1, 1, 3)
    cf = torch.tensor([[[[0.0, 0.5, 1.0]]]])  # normalised differences 0, 0.5, 1
    assert difference_mask(cf, x, 1, 0.5).flatten().tolist() == [0.0, 0.0, 1.0]
    assert difference_mask(cf, x, 1, 0.5, inclusive=True).flatten().tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("path", ["dime.DiME", "fastdime.FastDiME", "ace.ACE", "dvce.DVCE", "ldce.LDCE",
                                  "diffae_cf.DiffAECounterfactual", "diffae_cf.DiffAERE", "maskdime.MaskDiME"])
def test_each_method_states_its_sampler_and_one_check_refuses_another(path):
    from types import SimpleNamespace

    from cfx_cli.errors import CfxError
    from cfx_cli.methods.base import check_sampler

    module, name = path.split(".")
    cls = getattr(__import__(f"cfx_cli.methods.{module}", fromlist=[name]), name)
    need = cls.sampler_kind
    other = {"ddpm": "ddim", "ddim": "ddpm"}[need]
    check_sampler(cls, SimpleNamespace(kind=need, stochastic=False, eta=0.0))
    with pytest.raises(CfxError, match=f"method={cls.name} .*: use sampler={need}.*got sampler={other}"):
        check_sampler(cls, SimpleNamespace(kind=other, stochastic=True, eta=1.0))
    if getattr(cls, "sampler_deterministic", False):  # Diff-AE renders with η = 0
        with pytest.raises(CfxError, match="use sampler=ddim sampler.eta=0 .got sampler=ddim sampler.eta=0.5"):
            check_sampler(cls, SimpleNamespace(kind="ddim", stochastic=True, eta=0.5))
