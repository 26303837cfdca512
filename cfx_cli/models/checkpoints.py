"""Loading weight files safely: safetensors, or torch files with ``weights_only=True``."""
from __future__ import annotations

from pathlib import Path

import torch

from cfx_cli.errors import CfxError


def load_state_dict(path: str | Path, key: str = "weights", source: str = "") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, never executing a pickle.

    ``key`` is the config key that named the file, so the error says what to fix.
    """
    path = Path(path)
    if not path.exists():
        where = f" ({source})" if source else ""
        raise CfxError(f"{key}={path} does not exist: download or convert the weights{where} and set {key}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a pickle (or anything else) under a .safetensors name
            head = path.read_bytes()[:2] if path.is_file() else b""
            what = "a pickle (torch.save) file" if head[:1] == b"\x80" or head == b"PK" else "not a safetensors file"
            raise CfxError(f"{key}={path} is {what} named .safetensors ({type(e).__name__}): re-save it with "
                           f"safetensors.torch.save_file, or point {key} at a valid .safetensors file") from None
    if path.suffix == ".ckpt":  # Lightning: trainer objects beside the weights, read as inert stand-ins
        from cfx_cli.models.lightning import read_state_dict

        return read_state_dict(path, key=key)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an arbitrary pickle is refused by weights_only
        raise CfxError(f"{key}={path} is not a plain tensor checkpoint ({type(e).__name__}); "
                       f"cfx never unpickles untrusted objects: re-save it as safetensors") from None
    for wrapper in ("state_dict", "model"):  # common containers around a state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state
