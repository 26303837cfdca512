"""The job folder: writing it atomically, resuming it, reading it back.

    <job>/status.json         state running|done|failed, counts, timings, error
    <job>/samples.csv         one row per input image
    <job>/metrics.csv         set-level metrics (long format: metric,value)
    <job>/images/{original,counterfactual,diff[,mask]}/<index>.png
    <job>/grid.png            original | counterfactual | diff preview

A sample's images are written (to a temporary name, then renamed) before its
row is appended and flushed to samples.csv, so a row always means a finished
sample: a killed job resumes by skipping the indices already in samples.csv.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm import tqdm

from cfx_cli.errors import CfxError, DamagedJob
from cfx_cli.metrics.summary import finite, to_long

IMAGE_KINDS = ("original", "counterfactual", "diff")


def to_uint8(x: Tensor) -> np.ndarray:
    """C×H×W in [-1, 1] → H×W×C uint8 (1-channel maps in [0, 1] pass through ``map_to_uint8``)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(1, 2, 0).numpy()


def map_to_uint8(m: Tensor) -> np.ndarray:
    return (m.detach().float().cpu().clamp(0, 1)[0] * 255).round().byte().numpy()


def diff_image(x: Tensor, x_cf: Tensor) -> Tensor:
    """Σ_c |x_cf − x| scaled to [-1, 1] per image, as a grey RGB image (brighter = more change)."""
    d = (x_cf - x).abs().sum(0, keepdim=True)
    d = d / d.max().clamp_min(1e-8)
    return (d * 2 - 1).expand(3, -1, -1)


def _atomic_write_bytes(path: Path, save):
    tmp = path.with_name(path.name + ".tmp")
    save(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict):
    _atomic_write_bytes(Path(path), lambda p: p.write_text(json.dumps(data, indent=1, default=float)))


def _copy_yaml(src: Path, dst: Path):
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.yaml"):
            _atomic_write_bytes(dst / f.name, lambda p, b=f.read_bytes(): Path(p).write_bytes(b))


class JobLock:
    """One live process per job folder: an exclusive POSIX lock (``fcntl.lockf``, which also holds on
    NFS with a lock daemon) on ``<job>/.cfx/lock``. The operating system drops it when its holder exits
    or is killed, so a dead job never leaves the folder stuck; the file names the holder (host, pid,
    start) for the refusal message. Where ``fcntl`` does not exist (Windows) no lock is taken."""

    def __init__(self, job_dir: str | Path):
        self.path = Path(job_dir) / ".cfx" / "lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CfxError(f"hydra.run.dir={self.path.parent.parent} is in use by {holder}: one job folder takes one "
                           f"process; wait for it to end (or stop it) and re-run to resume, or choose another "
                           f"hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S')})\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self) -> "JobLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class JobWriter:
    def __init__(self, job_dir: str | Path):
        self.dir = Path(job_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.dir / "samples.csv"
        self.status_path = self.dir / "status.json"
        self._columns: list[str] | None = None

    # Hydra rewrites .hydra/ before a job runs; a copy of the files of the last accepted start
    # lets a refused resume put them back, so that the folder still describes its samples.
    def snapshot_hydra(self):
        _copy_yaml(self.dir / ".hydra", self.dir / ".cfx" / "hydra")

    def restore_hydra(self):
        _copy_yaml(self.dir / ".cfx" / "hydra", self.dir / ".hydra")

    # ----------------------------------------------------------------- resume
    def start(self):
        """Start (or resume) writing. A kill mid-write can leave a last row without its newline:
        cut it, so that the sample is redone rather than counted done from a partial row, and
        the next row starts a line."""
        if not self.samples_path.exists():
            return
        data = self.samples_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.samples_path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def done_indices(self) -> set[int]:
        if not self.samples_path.exists() or self.samples_path.stat().st_size == 0:
            return set()
        try:
            return set(read_samples(self.dir)["index"].astype(int).tolist())
        except Exception as e:  # noqa: BLE001 - garbage where a resume expects its rows
                raise CfxError(f"hydra.run.dir={self.dir}: samples.csv cannot be read ({type(e).__name__}); move it "
                           f"away to start over, or choose another hydra.run.dir") from None

    def read_status(self) -> dict:
        if not self.status_path.exists():
            return {}
        try:
            status = json.loads(self.status_path.read_text())
            if not isinstance(status, dict):
                raise ValueError("not a JSON object")
            return status
        except (OSError, ValueError) as e:
                raise CfxError(f"hydra.run.dir={self.dir}: status.json cannot be read ({e}); move it away (the "
                           f"samples stay valid) or choose another hydra.run.dir") from None

    def put_back(self, status: dict) -> None:
        """A refused resume: status.json and .hydra/ as the last accepted run left them."""
        write_json(self.status_path, status)
        self.restore_hydra()

    def status(self, **fields):
        status = self.read_status()
        status.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json(self.status_path, status)
        return status

    # ------------------------------------------------------------------ write
    def add(self, rows: list[dict], images: dict[str, Tensor]):
        """Write one batch: ``images[kind]`` is N×C×H×W ([-1, 1], or N×1×H×W maps in [0, 1]) for the
        first N rows (rows after them, such as unreadable items, have no images)."""
        for kind, batch in images.items():
            folder = self.dir / "images" / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i, row in enumerate(rows[:len(batch)]):
                arr = map_to_uint8(batch[i]) if batch.shape[1] == 1 else to_uint8(batch[i])
                _atomic_write_bytes(folder / f"{row['index']}.png",
                                    lambda p, a=arr: Image.fromarray(a).save(p, format="PNG"))
        if self._columns is None and self.samples_path.exists() and self.samples_path.stat().st_size > 0:
            with open(self.samples_path, newline="") as fh:  # resuming: keep the file's columns
                self._columns = next(csv.reader(fh), None)
        new = self._columns is None
        if new:
            self._columns = list(rows[0].keys())
        with open(self.samples_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
            fh.flush()
            os.fsync(fh.fileno())

    def update_samples(self, columns: dict[str, dict[int, float]]) -> None:
        """Per-sample columns set or added by index (the job's end metrics)."""
        update_samples(self.dir, columns)

    def write_classes(self, classes: list[str]) -> None:
        """classes.json: the class mapping, for people and for the tables."""
        write_json(self.dir / "classes.json", dict(enumerate(classes)))

    def write_metrics(self, metrics: dict[str, float]):
        _atomic_write_bytes(self.dir / "metrics.csv", lambda p: to_long(metrics).to_csv(p, index=False))

    def write_grid(self, max_rows: int = 8):
        """original | counterfactual | diff for the first samples, 4× enlarged for a human eye; each row
        labelled on its left with its classes (label -> target) and its outcome (real / corrected / adversarial /
        failed)."""
        if not self.samples_path.exists():
            return None
        tiles, labels = [], []
        for _, row in read_samples(self.dir).sort_values("index").iterrows():
            idx = int(row["index"])
            paths = [self.dir / "images" / k / f"{idx}.png" for k in IMAGE_KINDS]
            if not all(p.exists() for p in paths):  # an unreadable item has no images
                continue
            imgs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
            tiles.append(np.concatenate(imgs, axis=1))
            labels.append(grid_label(row))
            if len(tiles) == max_rows:
                break
        if not tiles:
            return None
        grid = np.concatenate(tiles, axis=0)
        h, w = grid.shape[:2]
        scale = max(1, 256 // max(1, imgs[0].shape[0]))
        img = Image.fromarray(grid).resize((w * scale, h * scale), Image.NEAREST)
        margin = 170
        canvas = Image.new("RGB", (img.width + margin, img.height), "white")
        canvas.paste(img, (margin, 0))
        draw, row_h = ImageDraw.Draw(canvas), img.height // len(tiles)
        font = ImageFont.load_default(size=15)  # Pillow's default size (10) runs "(got circle)" together
        for i, text in enumerate(labels):
            draw.multiline_text((6, i * row_h + 6), text, fill="black", font=font)
        _atomic_write_bytes(self.dir / "grid.png", lambda p: canvas.save(p, format="PNG"))
        return self.dir / "grid.png"


# What a job's start writes before its first sample: Hydra's record (.hydra/), cfx's lock and its copy of
# that record (.cfx/), status.json and classes.json (and their temporary names, were a write cut short).
START_FILES = frozenset({
    *(f"{d}/{f}.yaml" for d in (".hydra", ".cfx/hydra") for f in ("config", "hydra", "overrides")),
    ".cfx/lock", "status.json", "status.json.tmp", "classes.json", "classes.json.tmp"})


def remove_unwritten(job_dir: str | Path, also: tuple[str, ...] = ()) -> bool:
    """Remove a job folder that holds only what its start wrote (``START_FILES``, and ``also``: Hydra's job
    log): a run that failed before its first sample leaves nothing for ``cfx aggregate`` to list and nothing
    a resume needs. A folder with anything else (a sample's row or image, a user's own file) stays whole.
    True when it is gone. Call it while holding the folder's lock: the lock file goes too (a lock on a
    removed file still holds), so that no second process starts in a folder being removed."""
    root = Path(job_dir)
    if not root.is_dir():
        return False
    known = START_FILES | set(also)
    files, dirs = [], []
    for top, subdirs, names in os.walk(root):  # never into a linked folder: a link is a foreign file here
        here = Path(top)
        files += [here / n for n in names] + [here / d for d in subdirs if (here / d).is_symlink()]
        dirs += [here / d for d in subdirs if not (here / d).is_symlink()]
    if any(f.relative_to(root).as_posix() not in known for f in files):
        return False
    try:
        for f in files:
            f.unlink()
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            d.rmdir()
        if root.resolve() != Path.cwd().resolve():  # `hydra.run.dir=.`: emptied, never removed
            root.rmdir()
    except OSError:  # a file appeared meanwhile, or no permission: what is left stays
        return False
    return True


def grid_label(row) -> str:
    """A grid row's label: index, label -> target (class names where known) and the outcome."""
    def name(col):
        v = row.get(f"{col}_name")
        if isinstance(v, str) and v:
            return v
        v = row.get(col)
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    outcome = row.get("outcome")
    if not isinstance(outcome, str) or not outcome:  # a job made before outcomes were written
        outcome = "success" if str(row.get("success")) == "True" else "failed"
    return f"#{int(row['index'])}  {name('label')} -> {name('target')}\n{outcome} (got {name('cf_pred')})"


def _cell(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (np.floating, float)):
        return f"{float(v):.6g}"
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_samples(job_dir: str | Path) -> pd.DataFrame:
    """samples.csv; a torn last line (a kill mid-write) is dropped, duplicates keep the first row."""
    path = Path(job_dir) / "samples.csv"
    df = pd.read_csv(path, on_bad_lines="skip")
    df = df[pd.to_numeric(df["index"], errors="coerce").notna()]
    if "success" in df:
        df = df[df["success"].isin([True, False, "True", "False"])]
        df["success"] = df["success"].astype(str) == "True"
    df["index"] = df["index"].astype(int)
    return df.drop_duplicates("index", keep="first")


def damage(job_dir: str | Path, images: bool = True) -> tuple[list[str], set[int]]:
    """What is wrong with a finished job folder before it is read (``cfx evaluate``, ``cfx aggregate``): one
    line per problem, each naming the file, and the indices of the samples it spoils. samples.csv must parse
    whole (no row cut mid-line, no open quote, every row its header's width); metrics.csv must end its last
    line; a sample that did not fail must have readable images/original/<i>.png and counterfactual/<i>.png
    (an unreadable item's failed row has none)."""
    job = Path(job_dir)
    problems: list[str] = []
    spoiled: set[int] = set()
    for name in ("samples.csv", "metrics.csv"):
        path = job / name
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            problems.append(f"{path} is cut mid-line (its last line has no end)")
    path = job / "samples.csv"
    if not path.is_file():
        return problems, spoiled
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh, strict=True))
    except (csv.Error, UnicodeDecodeError, OSError) as e:
        return problems + [f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"], spoiled
    if not rows or "index" not in rows[0]:
        return problems + [f"{path} has no header with an index column"], spoiled
    header, at = rows[0], rows[0].index("index")
    failed_at = header.index("failed") if "failed" in header else None
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            problems.append(f"{path} line {n} has {len(row)} fields, not {len(header)} (a damaged row)")
            try:
                spoiled.add(int(row[at]))
            except (ValueError, IndexError):
                pass
            continue
        try:
            index = int(row[at])
        except ValueError:
            problems.append(f"{path} line {n}: index {row[at]!r} is not a number")
            continue
        if not images or (failed_at is not None and row[failed_at] == "True"):
            continue
        for kind in ("original", "counterfactual"):
            png = job / "images" / kind / f"{index}.png"
            why = _unreadable(png)
            if why:
                problems.append(f"{png} {why} (sample {index})")
                spoiled.add(index)
    return problems, spoiled


def _unreadable(png: Path) -> str | None:
    if not png.is_file():
        return "is missing"
    try:
        with Image.open(png) as img:
            img.load()
    except Exception as e:  # noqa: BLE001 - truncated, not an image, unreadable
        return f"cannot be read ({type(e).__name__})"
    return None


def flatten_config(d: dict, prefix: str = "") -> dict:
    """A nested config as {"method.tau": 60, ...}; lists as "[a, b]" (e.g. method.scales), so that
    every value can be grouped by, compared and written to JSON."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = "[" + ", ".join(str(x) for x in v) + "]"
        else:
            out[key] = v
    return out


def read_metrics(job_dir: str | Path) -> dict[str, float]:
    path = Path(job_dir) / "metrics.csv"
    if not path.exists():
        return {}
    df = pd.read_csv(path)
    return dict(zip(df["metric"], df["value"].astype(float)))


# ------------------------------------------------------------------ reading a finished job, amending it
def job_config(job: str | Path) -> DictConfig | None:
    """The job's recorded config (.hydra/config.yaml), or None."""
    path = Path(job) / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def load_image(path: Path) -> torch.Tensor:
    img = Image.open(path)
    img = img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


class Pairs:
    """The samples that have both images (images/original/<index>.png, images/counterfactual/<index>.png),
    in index order, read batch by batch (a large job's images need not fit in memory at once). Several
    folders (the shards of one job) are read as one set: each row's images come from its own folder."""

    def __init__(self, jobs, samples: pd.DataFrame | None = None):
        jobs = [Path(jobs)] if isinstance(jobs, (str, Path)) else [Path(j) for j in jobs]
        frames = [(read_samples(j) if samples is None else samples).assign(_images=str(j / "images")) for j in jobs]
        rows = pd.concat(frames).drop_duplicates("index")
        has = [(Path(f) / "original" / f"{i}.png").is_file() and (Path(f) / "counterfactual" / f"{i}.png").is_file()
               for i, f in zip(rows["index"], rows["_images"])]
        self.rows = rows[np.asarray(has, dtype=bool)].sort_values("index")
        if self.rows.empty:
            raise CfxError(f"{', '.join(map(str, jobs))}: no sample has both images/original/<index>.png and "
                           f"images/counterfactual/<index>.png")
        self.index = self.rows["index"].astype(int).to_numpy()
        self.folders = [Path(f) for f in self.rows["_images"]]
        self.success = successful(self.rows)  # a successful counterfactual that did not fail

    def images(self, indices, kind: str = "counterfactual") -> torch.Tensor:
        """The ``kind`` images of the samples ``indices`` (N×C×H×W in [-1, 1])."""
        where = dict(zip(self.index.tolist(), self.folders))
        return torch.stack([load_image(where[i] / kind / f"{i}.png") for i in indices])

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, batch_size: int, kind: str = "counterfactual"):
        """(slice of the rows, originals, counterfactuals) for each batch: N×C×H×W in [-1, 1]. A metric over
        many images shows a bar (images measured, ETA) once it has run 2 s."""
        bar = tqdm(total=len(self.index), desc=f"metric over {kind}s", unit="img", leave=False, delay=2.0)
        for start in range(0, len(self.index), batch_size):
            sl = slice(start, min(start + batch_size, len(self.index)))
            pairs = list(zip(self.index[sl], self.folders[sl]))
            yield (sl, torch.stack([load_image(f / "original" / f"{i}.png") for i, f in pairs]),
                   torch.stack([load_image(f / kind / f"{i}.png") for i, f in pairs]))
            bar.update(sl.stop - sl.start)
        bar.close()


def load_pairs(job, samples: pd.DataFrame | None = None) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """The rows that have both images, and all their originals and counterfactuals at once (``job``: a
    folder, or the shard folders of one job)."""
    pairs = Pairs(job, samples)
    _, x, x_cf = next(pairs.batches(len(pairs)))
    return pairs.rows, x, x_cf


def successful(rows: pd.DataFrame) -> np.ndarray:
    ok = rows["success"].astype(bool).to_numpy().copy() if "success" in rows else np.zeros(len(rows), bool)
    if "failed" in rows:
        ok &= ~(rows["failed"].astype(str) == "True").to_numpy()
    return ok


def _atomic_write_rows(path: Path, rows: list[list[str]]) -> None:
    """Rows to ``path`` (temporary file, then renamed), keeping the line ending the file has (samples.csv:
    the csv module's \\r\\n; metrics.csv: pandas' \\n)."""
    ending = "\n"
    if path.is_file():
        with open(path, "rb") as fh:
            ending = "\r\n" if fh.readline().endswith(b"\r\n") else "\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh, lineterminator=ending).writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def update_metrics(job: Path, values: dict[str, float], missing: list[str]) -> None:
    """Replace (or add) the rows of ``values`` in metrics.csv, leaving every other row as written; a metric
    of ``missing`` gets an empty value unless the file already has one."""
    path = job / "metrics.csv"
    rows: list[list[str]] = []
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    if not rows or rows[0][:2] != ["metric", "value"]:
        rows = [["metric", "value"], *rows]
    where = {r[0]: i for i, r in enumerate(rows) if i}
    for name, v in values.items():
        cell = repr(float(v)) if finite(v) else ""
        if name in where:
            rows[where[name]] = [name, cell]
        else:
            where[name] = len(rows)
            rows.append([name, cell])
    for name in missing:
        if name not in where:
            rows.append([name, ""])
    _atomic_write_rows(path, rows)


def update_samples(job: Path, columns: dict[str, dict[int, float]]) -> None:
    """Set (or add) per-sample columns of samples.csv by index, leaving every other cell as written."""
    path = job / "samples.csv"
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    at = header.index("index")
    for name in columns:
        if name not in header:
            header.append(name)
            for r in rows[1:]:
                if len(r) == len(header) - 1:  # a torn row (killed mid-write) stays as it is
                    r.append("")
    for name, by_index in columns.items():
        col = header.index(name)
        for r in rows[1:]:
            if len(r) != len(header):
                continue
            try:
                r[col] = _number_cell(by_index.get(int(r[at])))
            except ValueError:
                continue
    _atomic_write_rows(path, rows)


def metrics_with_values(job: Path) -> set[str]:
    """The names of metrics.csv's rows that hold a value."""
    path = job / "metrics.csv"
    if not path.is_file():
        return set()
    with open(path, newline="") as fh:
        return {r[0] for r in csv.reader(fh) if r and r[0] != "metric" and len(r) > 1 and r[1] != ""}



def find_jobs(paths: list[str]) -> list[Path]:
    jobs = set()
    for p in map(Path, paths):
        if not p.exists():
            raise SystemExit(f"cfx aggregate: error: {p} does not exist")
        for marker in [p / "status.json", *p.rglob("status.json"), *p.rglob(".hydra/config.yaml")]:
            if marker.exists():
                jobs.add(marker.parent.parent if marker.parent.name == ".hydra" else marker.parent)
    return sorted(jobs)


def job_record(job: Path) -> dict:
    """Config choices and values of one job, its state and its metrics; a folder whose files cannot be
    read (a truncated status.json, a garbage CSV, broken YAML) is an ``unreadable`` record naming why."""
    rec: dict = {"job": str(job)}
    try:
        return _job_record(job, rec)
    except Exception as e:  # noqa: BLE001 - any parse error of any file: list the folder, table the rest
        why = str(e) if isinstance(e, DamagedJob) else f"{type(e).__name__}: {e}"
        # what was read stays (its config: the shard of a sharded job is still grouped with its job)
        return {"method": None, "model": None, **rec, "state": "unreadable",
                "error": (why.splitlines() or [""])[0][:300], "metrics": {}, "task": rec.get("task")}


def _job_record(job: Path, rec: dict) -> dict:
    cfg_file, hydra_file = job / ".hydra" / "config.yaml", job / ".hydra" / "hydra.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    rec.update(flatten_config(cfg or {}))
    if hydra_file.exists():
        choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
        rec.update({k: v for k, v in choices.items() if not k.startswith("hydra/")})
    if "method" not in rec:  # an older cfx's method.name, else the method class's own name
        from cfx_cli.config import choice

        rec["method"] = rec.get("method.name") or choice({"method": {"_target_": rec.get("method._target_")}}, "method")
    kind = "classifier" if rec.get("regressor") in (None, "null") and "classifier" in rec else "regressor"
    rec["model"] = rec.get(kind)
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else []
    for o in overrides:  # another file in the group's slot: the table names the file, not the group
        if isinstance(o, str) and o.lstrip("+").startswith(f"{kind}.path="):
            rec["model"] = o.split("=", 1)[1]
    status = json.loads((job / "status.json").read_text()) if (job / "status.json").exists() else {}
    rec["state"] = status.get("state", "missing")
    rec["error"] = status.get("error")
    rec["task"] = status.get("task")
    if rec["state"] == "done":  # a finished job's files must be whole before a table averages them
        problems = damage(job, images=False)[0]
        if problems:
            raise DamagedJob(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    rec["metrics"] = read_metrics(job)
    return rec



def _number_cell(v) -> str:
    return f"{float(v):.6g}" if finite(v) else ""
