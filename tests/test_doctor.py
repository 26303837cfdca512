"""`cfx doctor`: every file the composed job needs, and whether each part builds, without running it."""
from cfx_cli import ZOO_DIR
from cfx_cli.commands.doctor import Check, config_checks, doctor, report, verdict, walk

from conftest import cfx


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_default_config_is_ready(compose):
    cfg = compose()
    checks = doctor(cfg)
    bad = [c for c in checks if c.ok is not True]
    assert not bad, report(checks, cfg)
    named = by_name(checks)
    # every path-like key, nested ones included, with its resolved value
    files = {c.name: c.value for c in checks if c.group == "file"}
    assert files == {"classifier.path": str(ZOO_DIR / "synthetic_shape"),
                     "diffusion.path": str(ZOO_DIR / "synthetic_ddpm"),
                     "metrics.oracle.path": str(ZOO_DIR / "synthetic_oracle"),
                     "metrics.evaluate.attributes.oracle.path": str(ZOO_DIR / "synthetic_oracle")}
    for part in ("device", "dataset", "job", "classifier", "target", "diffusion", "image size", "sampler", "method",
                 "metrics.oracle"):
        assert named[part].ok is True, part
    assert "32 images" in named["dataset"].detail and "32×32" in named["diffusion"].detail
    assert "cpu" in named["device"].detail
    assert verdict(checks).startswith("ready: ") and "checks passed" in verdict(checks)


def test_missing_model_files_are_reported_and_the_rest_still_checked(compose, tmp_path):
    cfg = compose([f"diffusion.path={tmp_path / 'no_ddpm'}", f"classifier.path={tmp_path / 'no_clf'}",
                   f"method.perceptual_weights={tmp_path / 'vgg.pth'}"])
    checks = doctor(cfg)
    named = by_name(checks)
    for key in ("diffusion.path", "classifier.path", "method.perceptual_weights"):  # nested key too
        assert named[key].group == "file" and named[key].ok is False and named[key].detail == "missing", key
    assert named["diffusion"].ok is False and "diffusion.path=" in named["diffusion"].detail
    assert named["classifier"].ok is False and "classifier.path=" in named["classifier"].detail
    # one line each, the CLI's user-error style, no traceback
    assert "\n" not in named["diffusion"].detail and "Traceback" not in named["diffusion"].detail
    # the parts that do not need them are still checked
    assert named["dataset"].ok is True and named["metrics.oracle"].ok is True
    # the parts that do are marked not checked, not hidden
    assert named["sampler"].ok is None and "diffusion" in named["sampler"].detail
    assert named["method"].ok is None and named["target"].ok is None
    v = verdict(checks)
    assert v.startswith("5 problems:") and "diffusion.path" in v and "classifier.path" in v


def test_only_the_diffusion_model_missing(compose, tmp_path):
    named = by_name(doctor(compose([f"diffusion.path={tmp_path}/none"])))
    assert named["diffusion"].ok is False
    assert named["classifier"].ok is True and named["target"].ok is True and named["dataset"].ok is True


def test_folder_dataset_without_root(compose):
    cfg = compose(["dataset=folder", "metrics=basic"])
    checks = doctor(cfg)
    named = by_name(checks)
    root = named["dataset.root"]
    assert root.ok is False and root.value == "???" and "dataset.root=" in root.detail
    assert named["dataset"].ok is False
    assert named["dataset"].detail.startswith("dataset.root has no value (???)")
    # the models still load (the explained model on a blank image)
    assert named["classifier"].ok is True and "blank" in named["classifier"].detail
    assert named["diffusion"].ok is True and named["method"].ok is True
    assert "metrics.oracle" not in named  # metrics=basic: no oracle
    assert verdict(checks) == "2 problems: dataset.root, dataset"


def test_walk_reports_missing_and_nested():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": {"path": "???", "b": [{"weights": "w"}]}, "c": "${a.path}", "d": None})
    assert dict(walk(cfg)) == {"a.path": "???", "a.b[0].weights": "w", "d": None}


def test_cli_doctor_smoke():
    proc = cfx("doctor", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "diffusion.path" in proc.stdout and str(ZOO_DIR / "synthetic_ddpm") in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("ready: ")


def test_cli_check_alias_exits_1_on_a_problem(capsys, monkeypatch, tmp_path):
    import sys

    import pytest

    from cfx_cli.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # _hydra sets sys.argv
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["check", "diffusion.path=/nonexistent/ddpm"])
    out = capsys.readouterr().out
    assert exit_.value.code == 1, out
    assert "/nonexistent/ddpm" in out
    assert out.strip().splitlines()[-1].startswith("2 problems: diffusion.path, diffusion")
    assert not list(tmp_path.iterdir())  # no job folder, no outputs/


def test_doctor_passes_on_the_synthetic_diffae(compose):
    """DiffAE's `diffusion.weights: ema` names which weights to load, not a file (issue 17)."""
    cfg = compose(["method=diffae"])
    checks = doctor(cfg)
    assert verdict(checks).startswith("ready: "), report(checks, cfg)
    assert "diffusion.weights" not in by_name(checks)


def test_diffae_real_checkpoint_config_names_only_its_files(compose, tmp_path):
    cfg = compose(["diffusion=diffae_ffhq256", f"diffusion.path={tmp_path / 'last.ckpt'}"])
    files = {c.name: c for c in config_checks(cfg) if c.group == "file"}
    assert "diffusion.weights" not in files and not any(c.value == "ema" for c in files.values())
    assert files["diffusion.path"].ok is False and files["diffusion.path"].detail == "missing"
