"""A job folder on a shared cluster, with real processes: one live process per folder (a second is
refused in one line and changes nothing), SIGTERM records `interrupted` and exits cleanly, and a
holder killed with SIGKILL leaves no stale lock: the next run resumes and finishes the job."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import ROOT

ARGS = ["run", "debug=fast", "method=dime", "dataset.num_images=8", "batch_size=1", "device=cpu"]


def start(job_dir):
    return subprocess.Popen([sys.executable, "-m", "cfx_cli.cli", *ARGS, f"hydra.run.dir={job_dir}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def wait_for_rows(job_dir, proc, n=1, timeout=120):
    """Until samples.csv has n rows (the job is past its start and writing)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        path = job_dir / "samples.csv"
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        time.sleep(0.1)
    raise AssertionError("the job wrote no rows in time")


def state(job_dir):
    return json.loads((job_dir / "status.json").read_text())


def test_one_process_per_job_folder_sigterm_and_sigkill(tmp_path):
    job_dir = tmp_path / "job"
    first = start(job_dir)
    wait_for_rows(job_dir, first)

    # a second process into the same folder (a re-queued SLURM job racing its predecessor): refused,
    # in one line naming the holder, and the holder's record (.hydra/, status) is left as it was
    hydra_before = (job_dir / ".hydra" / "overrides.yaml").read_bytes()
    second = subprocess.run([sys.executable, "-m", "cfx_cli.cli", *ARGS, "method.lambda_l1=0.1",
                             f"hydra.run.dir={job_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and "is in use by pid" in err[0] and str(first.pid) in err[0], second.stderr
    assert (job_dir / ".hydra" / "overrides.yaml").read_bytes() == hydra_before
    assert state(job_dir)["state"] == "running"

    # SIGTERM (a time limit): the job records `interrupted` and exits cleanly with one line
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 143, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "%|" not in ln and "accuracy on" not in ln]
    assert len(lines) == 1 and "interrupted (SIGTERM)" in lines[0] and "Traceback" not in err, err
    assert state(job_dir)["state"] == "interrupted"

    # resumed, then killed outright: the OS drops the lock with the process
    third = start(job_dir)
    wait_for_rows(job_dir, third, n=len(pd.read_csv(job_dir / "samples.csv")) + 1)
    third.kill()
    third.communicate(timeout=60)

    # ... so the next run takes the folder and finishes the job: every image once
    last = subprocess.run([sys.executable, "-m", "cfx_cli.cli", *ARGS, f"hydra.run.dir={job_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    s = pd.read_csv(job_dir / "samples.csv")
    assert sorted(s["index"]) == list(range(8))
    assert state(job_dir)["state"] == "done"


def write_folder(root, n=4):
    """n 32×32 synthetic renders as PNGs under root/<shape>/."""
    from PIL import Image

    from cfx_cli.data.synthetic import SyntheticWorld
    from cfx_cli.outputs import to_uint8

    world = SyntheticWorld()
    f = world.factors_for_indices("test", range(n), 0)
    for i, x in enumerate(world.render(f)):
        d = root / world.shapes[int(f["shape"][i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(x)).save(d / f"img{i}.png")


def folder_job(compose, root, *more):
    return compose(["debug=fast", "device=cpu", "dataset=folder", f"dataset.root={root}", *more])


def test_unreadable_items_fail_alone_and_the_job_goes_on(tmp_path, compose):
    from cfx_cli.job.loop import job

    root = tmp_path / "data"
    write_folder(root)
    (root / "circle").mkdir(exist_ok=True)
    (root / "circle" / "truncated.png").write_bytes(next(root.rglob("img*.png")).read_bytes()[:60])
    (root / "square" / "notes.png").write_text("not an image")
    (root / "square" / "folder.png").mkdir()  # a folder named like an image is no item
    metrics = job(folder_job(compose, root, "dataset.num_images=null", "batch_size=2"), tmp_path / "job")
    s = pd.read_csv(tmp_path / "job" / "samples.csv").set_index("id")
    assert len(s) == 6 and "square/folder.png" not in s.index
    for bad in ("circle/truncated.png", "square/notes.png"):
        assert bool(s.loc[bad, "failed"]) and not bool(s.loc[bad, "success"])
        assert "UnidentifiedImageError" in s.loc[bad, "error"] or "OSError" in s.loc[bad, "error"]
    good = s.drop(index=["circle/truncated.png", "square/notes.png"])
    assert not good["failed"].astype(bool).any() and good["cf_pred"].notna().all()
    assert metrics["num_failed"] == 2 and metrics["num_samples"] == 6
    assert state(tmp_path / "job")["state"] == "done"


def test_resume_refuses_a_folder_dataset_that_changed(tmp_path, compose):
    from cfx_cli.errors import user_error
    from cfx_cli.job.loop import job

    root = tmp_path / "data"
    write_folder(root)
    job(folder_job(compose, root, "dataset.num_images=2"), tmp_path / "job")
    before = {p.name: p.read_bytes() for p in (tmp_path / "job").iterdir() if p.is_file()}
    (root / "circle").mkdir(exist_ok=True)
    (root / "circle" / "a_new_first_image.png").write_bytes(next(root.rglob("img*.png")).read_bytes())
    try:
        job(folder_job(compose, root, "dataset.num_images=3"), tmp_path / "job")  # more images: a resume
        raise AssertionError("resumed over a changed dataset")
    except Exception as e:  # noqa: BLE001
        msg = user_error(e)
    assert msg and "\n" not in msg and "the dataset changed since" in msg and "a_new_first_image.png" in msg
    after = {p.name: p.read_bytes() for p in (tmp_path / "job").iterdir() if p.is_file()}
    assert after == before  # nothing in the folder changed, status.json included


def test_folder_num_images_zero_and_unknown_keys_are_refused(tmp_path, compose):
    from hydra.utils import instantiate

    from cfx_cli.errors import CfxError

    write_folder(tmp_path)
    for bad, needle in ((["dataset.num_images=0"], "dataset.num_images=0 must be a positive integer"),
                        (["+dataset.labels=x.csv"], "labels")):
        try:
            instantiate(folder_job(compose, tmp_path, *bad).dataset)
            raise AssertionError(f"accepted {bad}")
        except Exception as e:  # noqa: BLE001  (Hydra wraps constructor errors)
            text = str(e.__cause__ or e) if not isinstance(e, CfxError) else str(e)
            assert needle in text, text


def test_train_never_records_a_device_it_did_not_use(compose):
    """`cfx train ... device=cuda` used to train on the CPU and record device=cuda in the model's command."""
    from cfx_cli.errors import CfxError
    from cfx_cli.train.main import train

    for overrides, needles in ((["trainable=synthetic_shape", "device=cuda"], ("no CUDA device", "trains on the CPU")),
                               (["trainable=synthetic_ddpm", "device=mps"], ("not a training device",))):
        cfg = compose([*overrides, "out=/nonexistent/never_written"], config_name="train")
        try:
            train(cfg)
            raise AssertionError(f"trained with {overrides}")
        except CfxError as e:
            assert any(n in str(e) for n in needles) and "\n" not in str(e), str(e)


def _damaged_copies(tmp_path):
    """Copies of shipped models with one thing wrong each: override -> expected words of the one line."""
    import shutil

    from cfx_cli import ZOO_DIR

    cases = {}
    trunc = shutil.copytree(ZOO_DIR / "synthetic_shape", tmp_path / "truncated_clf")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases[f"classifier.path={trunc}"] = "cannot load model.safetensors"
    badjson = shutil.copytree(ZOO_DIR / "synthetic_shape", tmp_path / "badjson_clf")
    (badjson / "config.json").write_text('{"arch": "small_cnn", ')
    cases[f"classifier.path={badjson}"] = "config.json is not valid JSON"
    cases[f"classifier.path={ZOO_DIR / 'synthetic_oracle'}"] = "is a factor_oracle"
    cases[f"classifier.path={ZOO_DIR / 'synthetic_size'}"] = "is a regression model, not a classification one"
    ddpm = shutil.copytree(ZOO_DIR / "synthetic_ddpm", tmp_path / "truncated_ddpm")
    weights = next(ddpm.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    cases[f"diffusion.path={ddpm}"] = "cannot load the UNet"
    sched = shutil.copytree(ZOO_DIR / "synthetic_ddpm", tmp_path / "badsched_ddpm")
    next(sched.rglob("scheduler_config.json")).write_text("[1, 2")
    cases[f"diffusion.path={sched}"] = "is not valid JSON"
    pickled = shutil.copytree(ZOO_DIR / "synthetic_shape", tmp_path / "pickled_clf")  # torch.save under the name
    import torch
    from safetensors.torch import load

    state = load((pickled / "model.safetensors").read_bytes())  # (not load_file: it maps the file it overwrites)
    torch.save(state, pickled / "model.safetensors")
    cases[f"classifier.path={pickled}"] = "cannot load model.safetensors"
    return cases


def test_damaged_or_misplaced_model_files_are_one_line(tmp_path, compose):
    from cfx_cli.errors import user_error
    from cfx_cli.job.loop import job

    for n, (override, needle) in enumerate(_damaged_copies(tmp_path).items()):
        try:
            job(compose(["debug=fast", "device=cpu", override]), tmp_path / f"job{n}")
            raise AssertionError(f"ran with {override}")
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001
            msg = user_error(e)
        assert msg and "\n" not in msg and needle in msg, (override, msg)
        assert override.split("=", 1)[1] in msg  # names the file or folder


def test_garbage_in_a_job_folder_being_resumed_is_one_line_and_kept(tmp_path, compose):
    from cfx_cli.errors import user_error
    from cfx_cli.job.loop import job

    for name, garbage in (("samples.csv", b"\x00\x01\x02garbage\n\xff\xfe"), ("status.json", b'{"state": "runn')):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_bytes(garbage)
        try:
            job(compose(["debug=fast", "device=cpu"]), folder)
            raise AssertionError(f"resumed over a garbage {name}")
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001
            msg = user_error(e)
        assert msg and "\n" not in msg and f"{name} cannot be read" in msg and str(folder) in msg, msg
        assert (folder / name).read_bytes() == garbage  # kept for the user to look at


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path, compose, monkeypatch):
    import errno

    from cfx_cli.errors import user_error
    from cfx_cli.outputs import JobWriter
    from cfx_cli.job.loop import job

    def full(self, rows, images):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.samples_path))

    monkeypatch.setattr(JobWriter, "add", full)
    try:
        job(compose(["debug=fast", "device=cpu"]), tmp_path / "job")
        raise AssertionError("wrote to a full disk")
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = user_error(e)
    assert msg and "\n" not in msg and "No space left on device" in msg and str(tmp_path / "job") in msg
    assert state(tmp_path / "job")["state"] == "failed"  # recorded where it could be


def test_sanity_lines_and_the_class_mapping(tmp_path, compose, capsys):
    """Before explaining: the model's accuracy on the images it is about to explain (a warning near chance);
    the class mapping in classes.json and as names in samples.csv."""
    from cfx_cli.job.loop import job

    root = tmp_path / "data"
    write_folder(root, n=6)
    job(folder_job(compose, root), tmp_path / "job")
    err = capsys.readouterr().err
    assert "the classifier's accuracy on 4 of the images to explain: 1.00 (chance 0.50)" in err
    assert "warning: the classifier" not in err  # (the missing Inception/LPIPS weights are warned about)
    assert json.loads((tmp_path / "job" / "classes.json").read_text()) == {"0": "circle", "1": "square"}
    s = pd.read_csv(tmp_path / "job" / "samples.csv")
    assert (s["label_name"] == s["label"].map({0: "circle", 1: "square"})).all()
    assert (s["target_name"] == s["target"].map({0: "circle", 1: "square"})).all()
    assert state(tmp_path / "job")["sanity"]["model_accuracy"] == 1.0

    # the biased classifier reads backgrounds: on these images it is at chance or below, and says so
    job(folder_job(compose, root, "classifier=synthetic_shape_biased"), tmp_path / "biased")
    err = capsys.readouterr().err
    assert "warning: the classifier's accuracy on 4 of the images to explain" in err
    assert "is it the right model for this data?" in err


def test_cfx_train_never_overwrites_the_shipped_zoo_unless_asked(tmp_path):
    """A quick `cfx train <zoo model>` used to overwrite the shipped model in the checkout."""
    import hashlib

    from cfx_cli import ZOO_DIR
    from conftest import cfx

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    before = digest(ZOO_DIR / "synthetic_shape")
    proc = cfx("train", "synthetic_shape", "trainable.steps=2", "eval_images=16", f"work_dir={tmp_path / 'work'}",
               cwd=tmp_path)
    assert digest(ZOO_DIR / "synthetic_shape") == before
    made = tmp_path / "outputs" / "zoo" / "synthetic_shape"
    assert (made / "model.safetensors").exists() and "wrote outputs/zoo/synthetic_shape" in proc.stdout


def test_debug_flag_shows_the_full_traceback(tmp_path):
    """A bad value is one line; with --debug (or CFX_DEBUG=1) the same error comes with its traceback."""
    args = [sys.executable, "-m", "cfx_cli.cli", "run", "dataset.num_images=abc", f"hydra.run.dir={tmp_path / 'j'}"]
    plain = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("cfx: error: dataset.num_images")
    debug = subprocess.run([*args[:3], "--debug", *args[3:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CfxError" in debug.stderr


def _refusal(job, cfg, folder):
    from cfx_cli.errors import user_error

    try:
        job(cfg, folder)
    except Exception as e:  # noqa: BLE001
        msg = user_error(e)
        assert msg and "\n" not in msg, msg
        return msg
    raise AssertionError(f"resumed {folder}")


def test_a_model_replaced_under_the_same_path_refuses_the_resume(tmp_path, compose):
    """Rows 0-1 made by one classifier (or DDPM), rows 2-3 by another under the same path: refused, naming the
    file, and the folder is left as it was."""
    import shutil

    from cfx_cli import ZOO_DIR
    from cfx_cli.job.loop import job

    clf = shutil.copytree(ZOO_DIR / "synthetic_shape", tmp_path / "clf")
    ddpm = shutil.copytree(ZOO_DIR / "synthetic_ddpm", tmp_path / "ddpm")
    base = ["debug=fast", "device=cpu", f"classifier.path={clf}", f"diffusion.path={ddpm}", "metrics.evaluate.metrics=[]"]
    folder = tmp_path / "job"
    job(compose([*base, "dataset.num_images=2"]), folder)
    recorded = state(folder)["model_files"]
    assert set(recorded) >= {"classifier.path", "diffusion.path", "metrics.oracle.path"}
    import hashlib
    assert recorded["classifier.path"]["files"]["model.safetensors"] == \
        hashlib.sha256((clf / "model.safetensors").read_bytes()).hexdigest()

    # the classifier retrained (here: another one copied) under the same path, then the job extended
    shutil.copy(ZOO_DIR / "synthetic_shape_biased" / "model.safetensors", clf / "model.safetensors")
    before = ((folder / "samples.csv").read_bytes(), (folder / "status.json").read_bytes())
    msg = _refusal(job, compose([*base, "dataset.num_images=4"]), folder)
    assert f"classifier.path={clf}: model.safetensors changed" in msg and "another model" in msg, msg
    assert ((folder / "samples.csv").read_bytes(), (folder / "status.json").read_bytes()) == before

    # the old file back: the resume goes on and finishes the 4 images
    shutil.copy(ZOO_DIR / "synthetic_shape" / "model.safetensors", clf / "model.safetensors")
    weights = next(ddpm.rglob("*.safetensors"))  # a replaced DDPM: no accuracy warning would ever show it
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    msg = _refusal(job, compose([*base, "dataset.num_images=4"]), folder)
    assert f"diffusion.path={ddpm}: {weights.relative_to(ddpm)} changed" in msg, msg
    shutil.copy(next((ZOO_DIR / "synthetic_ddpm").rglob(weights.name)), weights)
    job(compose([*base, "dataset.num_images=4"]), folder)
    assert sorted(pd.read_csv(folder / "samples.csv")["index"]) == [0, 1, 2, 3]


def test_fewer_images_on_resume_is_refused_and_nothing_changes(tmp_path, compose):
    """num_images 2 -> 1 on a finished job: refused (a folder is never narrowed), every file as it was."""
    from cfx_cli.job.loop import job

    base = ["debug=fast", "device=cpu", "metrics.evaluate.metrics=[]"]
    folder = tmp_path / "job"
    job(compose([*base, "dataset.num_images=2"]), folder)
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and ".cfx" not in p.parts}
    msg = _refusal(job, compose([*base, "dataset.num_images=1"]), folder)
    assert "holds 1 sample(s) beyond the dataset's 1 images (indices 1..1" in msg and "at least 2" in msg, msg
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and ".cfx" not in p.parts} == files


def test_a_run_dir_that_is_a_file_under_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
    from conftest import cfx

    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    cases = {tmp_path / "afile": "is a file: give a folder", tmp_path / "afile" / "sub": f"is under {tmp_path / 'afile'}, which is a file",
             ro / "job": f"cannot write in {ro} (read-only or no permission)"}
    real = os.access
    # (tests run as root, for whom chmod does not make a folder read-only: the permission is what os.access says)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(ro) else real(p, mode, **kw))
    for cmd in (["run", "debug=fast"], ["train", "synthetic_shape"]):
        for folder, needle in cases.items():
            proc = cfx(*cmd, f"hydra.run.dir={folder}", check=False)
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(err) == 1 and f"hydra.run.dir={folder}" in err[0] and needle in err[0], err
    assert (tmp_path / "afile").read_text() == "x" and not (ro / "job").exists()


def test_bad_numbers_and_foreign_pickles_are_one_line(tmp_path):
    """cfx calibrate --rate -1, trainable.steps=abc / -5, a pickle named .safetensors, a malicious pickle as
    cfx train's checkpoint (refused, never run): each one line naming the key or file."""
    import torch
    from torch import nn

    from cfx_cli.errors import CfxError
    from cfx_cli.models.checkpoints import load_state_dict
    from cfx_cli.train.loop import Trainer
    from conftest import cfx

    for rate in ("-1", "0", "1.5"):
        proc = cfx("calibrate", "debug=fast", "--values", "1", "--rate", rate, check=False)
        assert proc.returncode == 2 and f"--rate {float(rate)}: a flip rate is a fraction in (0, 1]" in proc.stderr
    for steps in ("abc", "-5", "0"):
        proc = cfx("train", "synthetic_shape", f"trainable.steps={steps}", f"out={tmp_path / 'o'}",
                   f"work_dir={tmp_path / 'w'}", f"hydra.run.dir={tmp_path / 'h'}", check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and "trainable.steps=" in err[0] and \
            "not a whole number of at least 1" in err[0], err
    assert not (tmp_path / "o").exists()

    fake = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, fake)
    try:
        load_state_dict(fake, key="classifier.weights")
        raise AssertionError("loaded a pickle named .safetensors")
    except CfxError as e:
        assert f"classifier.weights={fake} is a pickle (torch.save) file named .safetensors" in str(e), str(e)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "work").mkdir()
    torch.save({"nets": Evil()}, tmp_path / "work" / "state.pt")
    try:
        Trainer({"m": nn.Linear(1, 1)}, tmp_path / "work", 1)
        raise AssertionError("resumed from a foreign pickle")
    except CfxError as e:
        assert f"work_dir={tmp_path / 'work'}: state.pt is not a cfx training checkpoint (UnpicklingError" in str(e)
    assert not (tmp_path / "ran").exists()  # refused, never executed


def test_process_level_a_run_dir_that_is_a_file(tmp_path):
    """The console script in its own process: no Hydra traceback, one line, exit 2, the file untouched."""
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "cfx_cli.cli", "run", f"hydra.run.dir={tmp_path / 'afile'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"cfx: error: hydra.run.dir={tmp_path / 'afile'} is a file: give a "
                                                f"folder (a new or an existing job folder)"]
    assert (tmp_path / "afile").read_text() == "x"


def test_a_job_stopped_before_its_first_sample_leaves_no_folder_unless_it_holds_more(tmp_path, compose, monkeypatch):
    """Told to (a single `cfx run`), a job refused at its start removes its folder, Hydra's log included; a
    folder with a file of the user's stays whole; one whose samples were written stays, marked failed."""
    import pytest

    import cfx_cli.job.loop as loop
    from cfx_cli.outputs import START_FILES

    refused = compose(["debug=fast", "device=cpu", "method.tau=500"])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.log").write_text("")
    with pytest.raises(Exception, match="method.tau=500"):
        loop.job(refused, bare, remove_if_unwritten=("run.log",))
    assert not bare.exists()

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="method.tau=500"):
        loop.job(refused, theirs, remove_if_unwritten=("run.log",))
    assert (theirs / "notes.txt").read_text() == "mine" and state(theirs)["state"] == "failed"
    assert {p.relative_to(theirs).as_posix() for p in theirs.rglob("*") if p.is_file()} <= START_FILES | {"notes.txt"}

    def fail(*args, **kwargs):  # after every sample was written: the set-level metrics fail
        raise RuntimeError("the end metrics broke")

    monkeypatch.setattr(loop, "finish", fail)
    written = tmp_path / "written"
    with pytest.raises(RuntimeError):
        loop.job(compose(["debug=fast", "device=cpu", "dataset.num_images=2", "batch_size=2", "metrics=basic",
                          "method.tau=2"]),
                 written, remove_if_unwritten=("run.log",))
    assert state(written)["state"] == "failed" and len(pd.read_csv(written / "samples.csv")) == 2

    here = tmp_path / "here"  # hydra.run.dir=. : the files go, the working folder stays
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(Exception, match="method.tau=500"):
        loop.job(refused, ".", remove_if_unwritten=())
    assert here.is_dir() and not list(here.iterdir())


def test_an_interrupt_before_the_first_sample_says_nothing_was_written(tmp_path, monkeypatch):
    """SIGTERM while the models load: exit 143, one line, no folder left to resume."""
    import cfx_cli.job.loop as loop
    from cfx_cli.errors import Interrupted
    from conftest import cfx

    class Loading(loop.JobParts):
        def all(self):
            raise Interrupted("SIGTERM")

    monkeypatch.setattr(loop, "JobParts", Loading)
    proc = cfx("run", "debug=fast", "device=cpu", f"hydra.run.dir={tmp_path / 'job'}", check=False)
    assert proc.returncode == 143
    assert proc.stderr.splitlines() == ["cfx: interrupted (SIGTERM): before the first sample: nothing was written"]
    assert not (tmp_path / "job").exists()


def test_a_sweep_keeps_the_folders_of_jobs_refused_at_their_start(tmp_path):
    """In a -m sweep each job's folder stays with its status (the sweep's last line and `cfx aggregate` count
    it), even a job refused before its first sample."""
    from conftest import cfx

    sweep = tmp_path / "sweep"
    proc = cfx("run", "-m", "debug=fast", "device=cpu", "method.tau=500,600", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(f"cfx run: 2 of 2 jobs of the sweep {sweep} did not finish")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [state(j)["state"] for j in jobs] == ["failed", "failed"]
    assert "method.tau=600 must lie in 1..50" in state(jobs[1])["error"]


def test_sigterm_while_a_part_loads_is_interrupted_not_failed():
    """Hydra's instantiate wraps a loader's exception (InstantiationException): a SIGTERM that lands while a
    model loads (a SLURM re-queue) must still reach the job as Interrupted, so status.json says
    `interrupted` and the re-queued job resumes, rather than `failed`."""
    import pytest
    import torch
    from hydra.errors import InstantiationException

    from cfx_cli.config import compose
    from cfx_cli.errors import Interrupted
    from cfx_cli.job.build import JobParts

    parts = JobParts(compose(["debug=fast"]), torch.device("cpu"))

    def loading():
        try:
            raise Interrupted("SIGTERM")
        except Interrupted as e:
            raise InstantiationException("Error in call to target 'cfx_cli.models.generative.load'") from e

    with pytest.raises(Interrupted, match="SIGTERM"):
        parts.part("diffusion", loading)
    assert "diffusion" not in parts.failed  # not recorded as a failed part: nothing failed

    def broken():
        raise InstantiationException("Error in call to target 'x': ValueError('bad')")

    with pytest.raises(InstantiationException):
        parts.part("sampler", broken)
    assert "sampler" in parts.failed
