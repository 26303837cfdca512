"""A job's identity beyond its config: the content of every model file it loads.

A config names a model by its path; a model retrained or copied over under the same path would make a resumed
job explain its first rows with one model and the rest with another. At a job's first start the sha256 of
every weight and config file that a config value names (the classifier or regressor, the robust model, the
diffusion model, the factor oracle, perceptual and metric weights: any existing file or folder in the job's
config outside ``dataset.`` and ``data.``) is recorded in status.json (``model_files``); a resume compares it
and refuses, in one line naming the file, when one changed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from cfx_cli.errors import CfxError

# In a model folder: the files that make the model (weights, configs), not sample grids or notes.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yaml", ".yml", ".npz", ".npy",
                  ".pkl", ".msgpack", ".onnx", ".h5")
SKIPPED_PREFIXES = ("dataset.", "data.")  # the images: checked row by row (check_items)
_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: each file hashed once


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, cached by (path, size, mtime) for this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]


def fingerprint(path: Path) -> dict[str, str]:
    """{relative file name: sha256} of a file, or of a folder's model files (weights and configs)."""
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*"))
            if f.is_file() and f.suffix.lower() in MODEL_SUFFIXES}


def model_files(config: dict) -> dict[str, dict]:
    """{config key: {"path", "files": {name: sha256}}} for each value of the flattened ``config`` that names an
    existing file or folder (outside dataset. and data.)."""
    found = {}
    for key, value in sorted(config.items()):
        if key.startswith(SKIPPED_PREFIXES) or not isinstance(value, str) or not value or "\n" in value:
            continue
        try:
            path = Path(value)
            if not path.exists():
                continue
            files = fingerprint(path)
        except OSError:  # unreadable: the loader reports it, with the key
            continue
        if files:
            found[key] = {"path": value, "files": files}
    return found


def changed(previous: dict, now: dict) -> list[str]:
    """What differs, as "KEY=PATH: FILE changed|is gone|is new" (keys both records have)."""
    lines = []
    for key in sorted(set(previous) & set(now)):
        was, is_ = previous[key].get("files", {}), now[key].get("files", {})
        where = now[key]["path"]
        for name in sorted(set(was) | set(is_)):
            if was.get(name) != is_.get(name):
                state = "is gone" if name not in is_ else ("is new" if name not in was else "changed")
                lines.append(f"{key}={where}: {name} {state} (sha256 {str(was.get(name))[:12]} -> "
                             f"{str(is_.get(name))[:12]})")
    return lines


def check_models(writer, config: dict, done: int) -> dict:
    """The job's model files now; a job folder that holds ``done`` samples made with other content under the
    same paths is refused in one line (its .hydra/ put back). Returns the record for status.json."""
    now = model_files(config)
    previous = writer.read_status().get("model_files")
    if done and previous:
        diff = changed(previous, now)
        if diff:
            writer.restore_hydra()
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise CfxError(f"hydra.run.dir={writer.dir} holds {done} samples made with another model: {diff[0]}{more}; "
                           f"its samples would mix two models: put the old file back to resume, or run into a new "
                           f"hydra.run.dir")
    return now

