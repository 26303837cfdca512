"""`cfx run` end to end: the job folder, resume after a kill, failed samples, clear errors."""
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import FAST, ROOT, cfx
from cfx_cli.outputs import read_samples


def run_dir(tmp_path, name="job"):
    return f"hydra.run.dir={tmp_path / name}"


def test_default_job_writes_the_job_folder(tmp_path):
    proc = cfx("run", *FAST, run_dir(tmp_path), subprocess_=True)  # the console entry point, in its own process
    job = tmp_path / "job"
    assert f"job folder: {job}" in proc.stdout and "flip_rate=" in proc.stdout
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "done" and status["written"] == 4 and status["error"] is None
    samples = pd.read_csv(job / "samples.csv")
    for col in ("index", "id", "label", "pred", "target", "cf_pred", "success", "failed", "l1", "l2", "mnac",
                "ideal_cf_l1", "bg_changed", "nfe_unet", "nfe_model", "seconds", "peak_mem_mib"):
        assert col in samples.columns, col
    assert sorted(samples["index"]) == [0, 1, 2, 3]
    assert (samples["target"] == 1 - samples["pred"]).all()  # flip the binary decision
    metrics = dict(pd.read_csv(job / "metrics.csv").values)
    assert metrics["flip_rate"] == pytest.approx(samples["success"].mean())
    assert metrics["l1"] == pytest.approx(samples["l1"].mean(), rel=1e-4)
    assert metrics["peak_mem_mib"] == samples["peak_mem_mib"].max() > 50  # a process with torch and four models
    for kind in ("original", "counterfactual", "diff", "mask"):
        assert len(list((job / "images" / kind).glob("*.png"))) == 4
    assert Image.open(job / "grid.png").size[0] > 3 * 32
    assert (job / ".hydra" / "config.yaml").exists()
    assert not_cfxs_own(proc.stderr) == [] and not warnings(proc.stderr), proc.stderr


def stderr_lines(stderr):
    """stderr's lines without the progress bar's ("fastdime:  50%|...", redrawn after carriage returns)."""
    bar = re.compile(r"^\w+:\s+\d+%\|")
    return [ln for ln in re.split(r"[\r\n]+", stderr) if ln.strip() and not bar.match(ln)]


def not_cfxs_own(stderr):
    """The lines a library printed (a warning, a hint): every line cfx prints starts with "cfx"."""
    return [ln for ln in stderr_lines(stderr) if not ln.startswith("cfx")]


def warnings(stderr):
    return [ln for ln in stderr_lines(stderr) if "warn" in ln.lower()]


def test_ldce_job_prints_no_library_warning(tmp_path):
    """diffusers warned twice per LDCE job ("pip install accelerate", once for the VAE, once for the UNet):
    the loader no longer asks for what needs accelerate where it is not installed. A fresh process, where a
    library's once-per-process warnings show."""
    proc = cfx("run", "debug=fast", "method=ldce", run_dir(tmp_path), subprocess_=True)
    assert "job folder:" in proc.stdout
    assert not_cfxs_own(proc.stderr) == [] and not warnings(proc.stderr), proc.stderr


def _rows(path):
    try:
        return len(read_samples(path))
    except Exception:
        return 0


def test_progress_moves_inside_a_batch_with_an_eta(tmp_path):
    """One batch of 4 (DiME, debug=fast): the bar shows fractions of counterfactuals while the batch runs,
    never going back, with a time left; each sample's outcome is in samples.csv."""
    proc = cfx("run", "debug=fast", "method=dime", run_dir(tmp_path))
    states = re.findall(r"(\d+\.\d)/4 \[[\d:]+<([\d:?]+)", proc.stderr)
    done = [float(n) for n, _ in states]
    inside = sorted({n for n in done if 0 < n < 4})
    assert len(inside) >= 3, f"the bar did not move inside the batch: {done}"
    assert done == sorted(done) and done[-1] == 4.0
    assert any(left != "?" for n, left in states if 0 < float(n) < 4)  # an ETA while the batch runs
    s = pd.read_csv(tmp_path / "job" / "samples.csv")
    expected = ["failed" if not ok else "real" if flip == 1 else "adversarial"
                for ok, flip in zip(s["success"], s["oracle_flip"])]
    assert list(s["outcome"]) == expected


def test_a_killed_job_resumes_and_loses_nothing(tmp_path):
    args = ["run", "dataset.num_images=6", "batch_size=2", "sampler.steps=50", "method.tau=15",
            "method.scales=[10.0]"]
    cfx(*args, run_dir(tmp_path, "whole"))
    job = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cfx_cli.cli", *args, f"hydra.run.dir={job}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _rows(job) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = _rows(job)
    assert 2 <= written < 6, "the job should have been stopped part-way"
    assert json.loads((job / "status.json").read_text())["state"] == "running"
    cfx(*args, f"hydra.run.dir={job}")
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "done" and status["resumed_from"] == written
    a, b = read_samples(job).sort_values("index"), read_samples(tmp_path / "whole").sort_values("index")
    assert list(a["index"]) == list(range(6))
    assert list(a["success"]) == list(b["success"])
    for i in range(6):  # same images as the uninterrupted run
        ia = np.asarray(Image.open(job / "images" / "counterfactual" / f"{i}.png"), dtype=int)
        ib = np.asarray(Image.open(tmp_path / "whole" / "images" / "counterfactual" / f"{i}.png"), dtype=int)
        assert np.abs(ia - ib).max() <= 1


def test_resume_repairs_a_torn_row_and_refuses_another_config(tmp_path):
    args = ["run", "dataset.num_images=4", "batch_size=2", "sampler.steps=50", "method.tau=15",
            "method.scales=[10.0]", run_dir(tmp_path)]
    cfx(*args)
    job = tmp_path / "job"
    before = read_samples(job).sort_values("index")
    # A kill mid-write: the last row lost its end (no newline).
    data = (job / "samples.csv").read_bytes()
    (job / "samples.csv").write_bytes(data[:data.rstrip(b"\n").rfind(b"\n") + 12])
    cfx(*args)
    after = read_samples(job).sort_values("index")
    assert list(after["index"]) == [0, 1, 2, 3] and list(after["success"]) == list(before["success"])
    assert json.loads((job / "status.json").read_text())["resumed_from"] == 3
    # Another method into the same folder would mix two jobs' samples: refused, nothing touched.
    files = {f: (job / f).read_bytes() for f in ("samples.csv", ".hydra/config.yaml", ".hydra/overrides.yaml")}
    proc = cfx("run", "method=dime", *[a for a in args[1:] if not a.startswith("method.mask_start")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"cfx: error: hydra.run.dir={job} holds 4 samples made with another config (")
    assert "method._target_='cfx_cli.methods.fastdime.FastDiME'->'cfx_cli.methods.dime.DiME'" in proc.stderr
    assert {f: (job / f).read_bytes() for f in files} == files  # Hydra's rewrite of .hydra/ undone too
    # Samples with no recorded config (an older cfx): not resumed blindly either.
    status = json.loads((job / "status.json").read_text())
    (job / "status.json").write_text(json.dumps({k: v for k, v in status.items() if k != "config"}))
    proc = cfx(*args, check=False)
    assert proc.returncode == 2 and "holds 4 samples but no record of their config" in proc.stderr
    (job / "status.json").write_text(json.dumps(status))
    # More images (or another batch size or device) is the same job, extended.
    cfx(*[a.replace("num_images=4", "num_images=5").replace("batch_size=2", "batch_size=1") for a in args])
    assert list(read_samples(job).sort_values("index")["index"]) == [0, 1, 2, 3, 4]


def test_a_nan_sample_is_marked_failed_and_the_job_goes_on(tmp_path, compose, monkeypatch):
    from cfx_cli.data.synthetic import SyntheticDataset
    from cfx_cli.job.loop import job

    original = SyntheticDataset.batch

    def batch_with_nan(self, indices):
        b = original(self, indices)
        for k, i in enumerate(indices):
            if i == 2:
                b["x"][k, :, 5, 5] = float("nan")
        return b

    monkeypatch.setattr(SyntheticDataset, "batch", batch_with_nan)
    cfg = compose([*FAST, "device=cpu"])
    metrics = job(cfg, tmp_path / "nan")
    s = read_samples(tmp_path / "nan").set_index("index")
    assert bool(s.loc[2, "failed"]) and not bool(s.loc[2, "success"])
    assert not s.drop(index=2)["failed"].astype(bool).any()
    others = s.drop(index=2)
    assert others[["cf_pred", "l1", "mnac"]].notna().all().all() and (others["nfe_unet"] > 0).all()
    assert metrics["num_failed"] == 1
    assert json.loads((tmp_path / "nan" / "status.json").read_text())["state"] == "done"


@pytest.mark.parametrize("override,needle", [
    ("diffusion.path=/nonexistent/ddpm", "diffusion.path=/nonexistent/ddpm does not exist"),
    ("classifier.path=/nonexistent/clf", "classifier.path=/nonexistent/clf is not a cfx zoo model"),
    ("dataset=folder", "dataset.root has no value"),
    ("method.variant=3", "method.variant='3' is unknown"),
    ("method.tau=500", "method.tau=500 must lie in 1..50"),
    ("metrics.evaluate.metrics=[fid,fidd]", "metrics.evaluate.metrics=fidd is unknown"),
    ("method.tau=0", "method.tau=0 must lie in 1..50"),
    ("sampler.steps=5000", "sampler.steps=5000 must lie in 1..1000"),
    ("sampler=ddim", "method=fastdime guides the DDPM posterior mean"),
    ("method.mask_start=30", "method.mask_start=30 must lie in 0..24"),
    ("method.mask_dilation=4", "method.mask_dilation=4 must be odd"),
    ("method.scales=[]", "method.scales is empty"),
    ("method.lambda_l1=nan", "method.lambda_l1=nan must be a finite number"),
    ("+method.lambda_typo=1", "method.lambda_typo is not a key of method=fastdime"),
    ("method.classifier_loss=hinge", "method.classifier_loss='hinge' is unknown"),
    ("method=dime method.lambda_perc=30", "method.perceptual_weights is null"),
    ("dataset.split=tst", "dataset.split='tst' is unknown"),
    ("dataset.num_images=0", "dataset.num_images=0 must be a positive integer"),
    ("dataset.num_images=-1", "dataset.num_images=-1 must be a positive integer"),
    ("dataset.num_images=abc", "dataset.num_images='abc' must be a number"),
    ("dataset.image_size=abc", "dataset.image_size='abc' must be a number"),
    ("target=class target.value=abc", "target.mode=class needs target.value=<class index> (an integer; got 'abc')"),
    ("metrics.size_tol=abc", "metrics.size_tol='abc' must be a number"),
    ("sampler.checkpoint=abc", "sampler.checkpoint='abc' must be true or false"),
    ("diffusion.clip_denoised=3", "diffusion.clip_denoised=3 must be true or false"),
    ("dataset.image_size=64", "dataset.image_size=64 but the diffusion model makes 32×32 images"),
    ("batch_size=0", "batch_size=0 must be at least 1"),
    ("batch_size=abc", "batch_size='abc' must be an integer"),
    ("seed=-1", "seed=-1 must be an integer in 0..4294967295"),
    ("seed=1e30", "seed=1e+30 must be an integer in 0..4294967295"),
    ("data.num_shards=0", "data.num_shards=0 must be an integer of at least 1"),
    ("device=meta", "device='meta' cannot run a job"),
    ("device=mps", "device=mps but MPS (Apple GPU) is not available here"),
    ("target=class target.value=5", "target.value=5 is not a class of this classifier"),
    ("regressor=synthetic_size target=absolute target.value=nan", "target.value=nan must be a finite number"),
    ("regressor=synthetic_size target.tolerance=0", "target.tolerance=0 must be positive"),
    ("method.tau=abc", "method.tau='abc' must be a number (default 60)"),
    ("method.scales=5", "method.scales=5 must be a list, e.g. [8,10,15]"),
    ("method.public_code_offset=maybe", "method.public_code_offset='maybe' must be true or false"),
    ("method=ace method.tau=51", "method.tau=51 must lie in 1..50"),
    ("method=ace sampler=ddim", "method=ace filters with stochastic DDPM steps"),
    ("method=ace method.iterations=0", "method.iterations=0 must be at least 1"),
    ("method=ace method.step=nan", "method.step=nan must be a finite number"),
    ("method=ace method.success_on=pe", "method.success_on='pe' is unknown"),
    ("method=dvce method.start=50", "method.start=50 is outside the sampler's grid 0..49"),
    ("method=dvce method.cone_angle=90", "method.cone_angle=90 must lie in (0, 90) degrees"),
    ("method=dvce ~robust_model", "method.cone_angle is set but there is no robust model"),
    ("method=dvce method.augmentations=0", "method.augmentations=0 must be at least 1"),
    ("method=dvce method.cone_inside=both", "method.cone_inside='both' is unknown"),
    ("method=dvce method.lambda_c=inf", "method.lambda_c=inf must be a finite number"),
])
def test_bad_input_gives_one_clear_line(tmp_path, compose, override, needle):
    """In-process: the error a user sees is one line naming the key, the value and the fix."""
    from cfx_cli.errors import user_error
    from cfx_cli.job.loop import job

    with pytest.raises(Exception) as err:
        job(compose(["debug=fast", "device=cpu", *override.split()]), tmp_path / "job")
    msg = user_error(err.value)
    assert msg is not None and "\n" not in msg and needle in msg, (msg, err.value)
    assert json.loads((tmp_path / "job" / "status.json").read_text())["state"] == "failed"


def test_bad_input_on_the_command_line_is_one_line(tmp_path):
    proc = cfx("run", "debug=fast", "method.tau=500", run_dir(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("cfx: error: method.tau=500 must lie in 1..50") and "Traceback" not in proc.stderr


def test_missing_dataset_folder(tmp_path):
    proc = cfx("run", "dataset=folder", f"dataset.root={tmp_path / 'nope'}", run_dir(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"cfx: error: dataset.root={tmp_path / 'nope'} is not a folder: point it to a " \
                                  f"folder of images (e.g. dataset.root=/data/my_images)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(tmp_path):
    proc = cfx("run", "device=cuda", *FAST, run_dir(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("cfx: error: device=cuda but no CUDA device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")
@pytest.mark.parametrize("method", ["fastdime", "dime"])
def test_cuda_job_flips_like_the_cpu_job(tmp_path, method):
    """The same job on CUDA and on the CPU: both finish and flip about as often, with edits of
    about the same size. (Noise is drawn on the CPU from the per-sample seed, but float rounding
    differs and the guided chains amplify it, so single images may go either way.)"""
    drop = ("dataset.num_images=", "batch_size=") + (("method.mask_start=",) if method == "dime" else ())
    eight = [o for o in FAST if not o.startswith(drop)]
    eight += ["dataset.num_images=8", "batch_size=8"]
    for device in ("cpu", "cuda"):
        cfx("run", f"method={method}", f"device={device}", *eight, run_dir(tmp_path, device))
    cpu, gpu = (pd.read_csv(tmp_path / d / "samples.csv") for d in ("cpu", "cuda"))
    assert len(gpu) == 8 and not gpu["failed"].any()
    assert 1 < gpu["peak_mem_mib"].max() < 4096  # the GPU's allocator: small models, a batch of 8
    assert gpu["success"].mean() >= cpu["success"].mean() - 0.25, (cpu["success"].mean(), gpu["success"].mean())
    assert gpu["l1"].mean() == pytest.approx(cpu["l1"].mean(), rel=0.25)


def _options(group):
    """The group's options as the conf folder holds them (one YAML file each)."""
    from cfx_cli import CONF_DIR

    return ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


@pytest.mark.parametrize("args,given,closest", [
    (["run", "method=dimee"], "method=dimee", "method=dime"),
    (["run", "dataset=synthetc"], "dataset=synthetc", "dataset=synthetic"),
    (["run", "classifier=synthetic_shape_bias"], "classifier=synthetic_shape_bias", "classifier=synthetic_shape_biased"),
    (["run", "sampler=ddmp"], "sampler=ddmp", "sampler=ddpm"),
    (["run", "debug=fats"], "debug=fats", "debug=fast"),
    (["run", "experiment=dime_celeb_smile"], "experiment=dime_celeb_smile", "experiment=dime_celeba_smile"),
    (["run", "-m", "method=dime,fastdim"], "method=fastdim", "method=fastdime"),  # a sweep: before any job
    (["doctor", "method=fastdim"], "method=fastdim", "method=fastdime"),
    (["calibrate", "method=fastdim", "--values", "1"], "method=fastdim", "method=fastdime"),  # the compose API
    (["train", "synthetic_shap"], "trainable=synthetic_shap", "trainable=synthetic_shape"),
])
def test_an_unknown_group_option_is_one_line_with_the_closest_and_the_choices(tmp_path, args, given, closest):
    """Instead of Hydra's block (the options one a line, the search path): one line, exit 2 as cfx's other
    config errors, and nothing written."""
    group = given.split("=")[0]
    out = [] if args[0] == "calibrate" else [f"hydra.{'sweep' if '-m' in args else 'run'}.dir={tmp_path / 'out'}"]
    proc = cfx(*args, *out, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"cfx: error: {given} is not an option of {group}; did you mean {closest}? "
                                        f"(choices: {_options(group)})"], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_an_unknown_option_of_hydras_own_groups_and_of_no_close_one(tmp_path):
    proc = cfx("run", "hydra/launcher=jobib", run_dir(tmp_path), check=False)
    err = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("cfx: error: hydra/launcher=jobib is not an option of hydra/launcher; did you mean "
                             "hydra/launcher=joblib? (choices: ")
    # Hydra's own launchers and cfx's (conf/hydra/launcher) alike
    choices = err[0].split("(choices: ")[1].rstrip(")").split(", ")
    assert {"basic", "joblib", *_options("hydra/launcher").split(", ")} <= set(choices)
    proc = cfx("run", "method=xyzzy", run_dir(tmp_path), check=False)  # nothing close: no guess
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"cfx: error: method=xyzzy is not an option of method (choices: {_options('method')})"]


def test_an_unknown_option_on_a_user_search_path_and_in_a_config_file(tmp_path):
    """A user's conf folder (hydra.searchpath, --config-dir) adds options, and a guess can be one of them; a
    bad option a config file asks for says so."""
    from cfx_cli import CONF_DIR

    mine = tmp_path / "myconf"
    (mine / "method").mkdir(parents=True)
    (mine / "method" / "mine.yaml").write_text((CONF_DIR / "method" / "fastdime.yaml").read_text())
    (mine / "experiment").mkdir()
    (mine / "experiment" / "asks.yaml").write_text("# @package _global_\ndefaults:\n  - /method: nosuch\n")
    (mine / "experiment" / "swaps.yaml").write_text("# @package _global_\ndefaults:\n  - override /method: nosuch\n")
    choices = ", ".join(sorted([*_options("method").split(", "), "mine"]))
    search = f"hydra.searchpath=[file://{mine}]"
    for flags in ([search], ["--config-dir", str(mine)]):
        proc = cfx("run", *flags, "method=mien", run_dir(tmp_path), check=False)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"cfx: error: method=mien is not an option of method; did you mean method=mine? (choices: {choices})"]
    proc = cfx("run", search, "experiment=asks", run_dir(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"cfx: error: method=nosuch (asked for in experiment/asks) is not an option of method (choices: {choices})"]
    proc = cfx("run", search, "experiment=swaps", run_dir(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"cfx: error: method=nosuch (not on the command line: a config file it chose asks for it) is not an option "
        f"of method (choices: {choices})"]


@pytest.mark.parametrize("args,line", [
    (["run", "method.tua=3"], "method.tua=3: method has no key tua; did you mean method.tau=3? (its keys: {method}; "
                              "to add a new key: +method.tua=3)"),
    (["run", "methd=dime"], "methd=dime: methd is not a key of the config; did you mean method=dime? (the keys: "
                            "batch_size, classifier, data, dataset, device, diffusion, method, metrics, sampler, seed, "
                            "target; to add a new key: +methd=dime)"),
    (["run", "-m", "dataset.num_imgs=3,4"], "dataset.num_imgs=3: dataset has no key num_imgs; did you mean "
                                            "dataset.num_images=3? (its keys: image_size, num_images, rho, seed, shapes, "
                                            "size_range, split; to add a new key: +dataset.num_imgs=3)"),
    (["run", "method.xyzzy=1"], "method.xyzzy=1: method has no key xyzzy (its keys: {method}; to add a new key: "
                                "+method.xyzzy=1)"),  # nothing close: no guess
])
def test_an_unknown_key_is_one_line_with_the_closest_and_the_keys(tmp_path, args, line):
    """Instead of Hydra's six lines (the struct error, its object type): the override as typed, the closest key
    of that node, its keys and how to add a key on purpose; exit 2, nothing written."""
    from cfx_cli import CONF_DIR

    method_keys = sorted(k for k in OmegaConf.load(CONF_DIR / "method" / "fastdime.yaml") if not k.startswith("_")
                         and k != "defaults")
    out = [f"hydra.{'sweep' if '-m' in args else 'run'}.dir={tmp_path / 'out'}"]
    proc = cfx(*args, *out, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["cfx: error: " + line.format(method=", ".join(method_keys))], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_other_hydra_errors_keep_hydras_report(tmp_path, monkeypatch):
    """Not an option or key error: a grammar error stays Hydra's own message (exit 1), a bug in the job its
    traceback from the task down, as Hydra shows it (exit 1)."""
    import cfx_cli.job.loop as loop

    proc = cfx("run", "method.tau=[1,2", run_dir(tmp_path), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("no viable alternative at input '[1,2'"), proc.stderr
    assert "Traceback" not in proc.stderr

    def bug(cfg, job_dir, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop, "job", bug)
    proc = cfx("run", run_dir(tmp_path), check=False)
    assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr
    frames = re.findall(r'File "([^"]+)", line \d+, in (\w+)', proc.stderr)
    assert frames[0][1] == "task" and frames[0][0].endswith("run.py"), frames  # Hydra's frames cut, as Hydra does
    assert "HYDRA_FULL_ERROR=1 for a complete stack trace" in proc.stderr


def test_a_run_that_fails_before_its_first_sample_leaves_no_folder(tmp_path):
    """The default folder (outputs/runs/...) of a run refused at its start is gone, so `cfx aggregate` tables
    the jobs that ran without listing it; a job that wrote samples keeps its folder when it fails later."""
    for bad in ("method.tau=500", "dataset.num_images=abc"):
        proc = cfx("run", *FAST, bad, "device=cpu", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not [p for p in (tmp_path / "outputs" / "runs").rglob("*") if p.is_file()]
    cfx("run", *FAST, "dataset.num_images=2", "batch_size=2", "metrics=basic", "device=cpu", cwd=tmp_path)
    agg = cfx("aggregate", "outputs/runs", "--metrics", "flip_rate", cwd=tmp_path, check=False)
    assert agg.returncode == 0 and "not included" not in agg.stdout, agg.stdout + agg.stderr
    assert list(pd.read_csv(tmp_path / "outputs" / "runs" / "table.csv")["n_jobs"]) == [1]
