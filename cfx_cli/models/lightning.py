"""Weights out of a PyTorch-Lightning ``.ckpt`` without running any of its pickled code.

A Lightning checkpoint is a ``torch.save``'d dict: the weights under ``state_dict`` and,
beside them, trainer objects (callbacks, hyper-parameter containers, enums, config
dataclasses of the training code). ``torch.load(weights_only=True)`` refuses those
globals. We list them (``torch.serialization.get_unsafe_globals_in_checkpoint``, a static
scan of the pickle) and admit, under each name, an *inert stand-in*: a class that accepts
any constructor arguments and state and does nothing with them. No class of the
training code is imported or run, so an untrusted checkpoint stays inert; only the
tensors are kept.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from cfx_cli.errors import CfxError


class Inert:
    """Stands in for a pickled trainer object: remembers what it was given, does nothing."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict subclasses (AttributeDict) are filled item by item
        self.items[key] = value

    def __repr__(self):
        return f"<inert {type(self).__module__}.{type(self).__qualname__}>"


def _stand_in(full_name: str, as_dict: bool = False):
    """An inert class under ``full_name``; a plain ``dict`` for dict subclasses (Lightning's
    AttributeDict): the weights-only loader fills only exact dicts item by item."""
    if as_dict:
        return dict, full_name
    module, _, name = full_name.rpartition(".")
    return type(name, (Inert,), {"__module__": module, "__qualname__": name}), full_name


def read_checkpoint(path: str | Path, key: str = "diffusion.path") -> dict:
    """The whole checkpoint dict, loaded weights-only with inert stand-ins for its trainer objects."""
    path = Path(path)
    if not path.is_file():
        raise CfxError(f"{key}={path} does not exist: point it to the checkpoint file (.ckpt)")
    if not zipfile.is_zipfile(path):
        raise CfxError(f"{key}={path} is not a torch.save zip archive (a truncated download, or a legacy "
                       f"pickle): re-download it, or re-save it with a recent torch.save")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - a damaged archive: name the file
        raise CfxError(f"{key}={path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    as_dict = {name for name in unsafe if name.endswith("AttributeDict")}
    for _ in range(len(unsafe) + 1):  # a dict subclass shows itself when the loader fills it: retry as dict
        try:
            with torch.serialization.safe_globals([_stand_in(n, n in as_dict) for n in unsafe]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            filled = re.search(r"SETITEMS? for dict.*but got <class '([\w.]+)'>", str(e))
            if filled and filled.group(1) in unsafe and filled.group(1) not in as_dict:
                as_dict.add(filled.group(1))
                continue
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "Unsupported global" in ln or "Can only" in ln), lines[0] if lines else "")
            raise CfxError(f"{key}={path}: cannot read the checkpoint weights-only ({type(e).__name__}: "
                           f"{why.strip()[:240]})") from None
    raise CfxError(f"{key}={path}: cannot read the checkpoint weights-only")


def read_state_dict(path: str | Path, key: str = "diffusion.path") -> dict[str, Tensor]:
    """``ckpt['state_dict']`` of a Lightning checkpoint (or the dict itself when it holds only tensors)."""
    ckpt = read_checkpoint(path, key)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        sd = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CfxError(f"{key}={path} holds no 'state_dict' (found {found}); is it a Lightning checkpoint?")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def sub_state_dict(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` (e.g. ``'ema_model.'``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
