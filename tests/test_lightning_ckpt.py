"""Lightning checkpoints are read weights-only: trainer objects become inert stand-ins, never code."""
import enum
import sys
import types

import pytest
import torch

from cfx_cli.errors import CfxError
from cfx_cli.models.lightning import Inert, read_checkpoint, read_state_dict, sub_state_dict

RAN = []


def _fake_lightning_module():
    """A stand-in for pytorch_lightning's modules, registered only while the test writes the file."""
    mod = types.ModuleType("fake_pl_callbacks")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/somewhere/last.ckpt"

        def __reduce__(self):  # what a hostile pickle would do: call code when loaded
            return (mod.run_payload, ("payload",))

    class AttributeDict(dict):
        pass

    class HParams(dict):  # a dict subclass under a name the reader does not know
        pass

    class Stage(enum.Enum):
        TRAIN = "train"

    def run_payload(arg):
        RAN.append(arg)

    for c in (ModelCheckpoint, AttributeDict, HParams, Stage, run_payload):
        c.__module__ = mod.__name__
        c.__qualname__ = c.__name__
        setattr(mod, c.__name__, c)
    return mod


def test_reads_weights_and_never_runs_pickled_code(tmp_path, monkeypatch):
    mod = _fake_lightning_module()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    sd = {"model.w": torch.arange(6.0).view(2, 3), "ema_model.w": torch.ones(2, 3), "x_T": torch.zeros(1)}
    hp = mod.AttributeDict(lr=1e-4, conf={"name": "ffhq256"})
    ckpt = {"state_dict": sd, "epoch": 3, "global_step": 10, "hyper_parameters": hp,
            "callbacks": {"ModelCheckpoint": mod.ModelCheckpoint()}, "stage": mod.Stage.TRAIN,
            "datamodule_hparams": mod.HParams(batch_size=8)}
    # torch.save pickles the callback through __reduce__ → RAN.append: a load that ran code would append
    torch.save(ckpt, tmp_path / "last.ckpt")
    monkeypatch.delitem(sys.modules, mod.__name__)  # the training code is not importable where cfx runs

    with pytest.raises(Exception):  # plain weights-only loading refuses the file
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    out = read_state_dict(tmp_path / "last.ckpt")
    whole = read_checkpoint(tmp_path / "last.ckpt")
    assert whole["hyper_parameters"]["lr"] == 1e-4 and whole["datamodule_hparams"] == {"batch_size": 8}
    assert RAN == []
    assert set(out) == set(sd)
    assert torch.equal(out["model.w"], sd["model.w"])
    assert torch.equal(sub_state_dict(out, "ema_model.")["w"], torch.ones(2, 3))


def test_stand_in_is_inert():
    obj = Inert(1, 2)
    obj.__setstate__({"a": 1})
    obj["k"] = "v"
    assert obj.args == (1, 2) and obj.state == {"a": 1} and obj.items == {"k": "v"}


def test_damaged_and_missing_files_are_one_line(tmp_path):
    with pytest.raises(CfxError, match="does not exist"):
        read_state_dict(tmp_path / "none.ckpt", key="diffusion.path")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CfxError, match="diffusion.path=.*not a torch.save zip"):
        read_state_dict(bad)
    torch.save({"epoch": 1}, tmp_path / "nosd.ckpt")
    with pytest.raises(CfxError, match="no 'state_dict'"):
        read_state_dict(tmp_path / "nosd.ckpt")
