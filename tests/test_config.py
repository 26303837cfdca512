"""Every config composes; per method×dataset defaults and the task switch come from config."""
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cfx_cli import CONF_DIR

GROUPS = ["dataset", "classifier", "regressor", "robust_model", "diffusion", "sampler", "method", "target", "metrics",
          "debug"]


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(compose, group, option):
    extra = {"dataset/folder": ["dataset.root=/tmp"], "diffusion/diffusers_ddpm": ["diffusion.path=/tmp"],
             "dataset/imagenet": ["dataset.root=/tmp"]}
    cfg = compose([f"{group}={option}", *extra.get(f"{group}/{option}", [])])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert group == "debug" or cfg[group] is not None  # debug files set keys across groups


@pytest.mark.parametrize("name", [p.stem for p in (CONF_DIR / "trainable").glob("*.yaml")])
def test_train_configs_compose(compose, name):
    cfg = compose([f"trainable={name}"], config_name="train")
    OmegaConf.resolve(cfg)
    assert cfg.trainable.name == name and Path(cfg.out).name == name


@pytest.mark.parametrize("exp", [p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")])
def test_experiments_compose(compose, exp):
    cfg = compose([f"experiment={exp}"])
    OmegaConf.resolve(cfg)


def test_tuning_is_keyed_on_method_and_generative_model(compose):
    paper = OmegaConf.load(CONF_DIR / "method" / "dime.yaml")
    assert (paper.sampler.steps, paper.method.tau, list(paper.method.scales), paper.method.lambda_l1) == \
        (200, 60, [8.0, 10.0, 15.0], 0.05)
    cfg = compose(["method=dime"])  # on the shipped synthetic DDPM: conf/tuning/dime_synthetic_ddpm.yaml
    assert (cfg.sampler.steps, cfg.method.tau, cfg.method.lambda_perc) == (100, 30, 0.0)
    # With another generative model the paper's values stand, whatever the dataset.
    other = compose(["method=dime", "diffusion=diffusers_ddpm", "diffusion.path=/tmp"])
    assert (other.sampler.steps, other.method.tau, list(other.method.scales)) == (200, 60, [8.0, 10.0, 15.0])
    assert compose(["method=dime", "dataset=folder", "dataset.root=/tmp"]).method.tau == 30


def test_regressor_alone_switches_the_task(compose):
    from cfx_cli.job.build import explained_model

    cfg = compose(["regressor=synthetic_size"])
    assert cfg.classifier is not None  # no need to unset it
    model, key = explained_model(cfg)
    assert key == "regressor" and model.task == "regression"
    # Regression guidance scales come from conf/tuning_regressor, for either method; a user's own
    # diffusion model has no tuning and keeps the method's paper scales.
    def tuned(path):
        return list(OmegaConf.load(CONF_DIR / path).method.scales)

    assert list(cfg.method.scales) == tuned("tuning_regressor/fastdime_synthetic_ddpm_synthetic_size.yaml")
    assert list(compose(["regressor=synthetic_size", "method=dime"]).method.scales) == \
        tuned("tuning_regressor/dime_synthetic_ddpm_synthetic_size.yaml")
    assert list(compose(["method=dime"]).method.scales) == tuned("tuning/dime_synthetic_ddpm.yaml")
    assert tuned("tuning_regressor/dime_synthetic_ddpm_synthetic_size.yaml") != tuned("tuning/dime_synthetic_ddpm.yaml")
    assert list(compose(["regressor=synthetic_size", "diffusion=diffusers_ddpm", "diffusion.path=/tmp"]).method.scales) \
        == list(OmegaConf.load(CONF_DIR / "method/fastdime.yaml").method.scales)


def test_method_configs_instantiate_their_classes(compose):
    for m in options("method"):
        cfg = compose([f"method={m}"])
        assert instantiate({"_target_": cfg.method._target_}, _partial_=True).func.name == m


@pytest.mark.parametrize("launcher", ["slurm", "local", "joblib", "submitit_local"])
def test_launcher_presets_compose(launcher):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert ("submitit" in target) == ("submitit" in launcher or launcher == "slurm")
    if launcher == "slurm":
        assert target.endswith("SlurmLauncher")
        assert cfg.hydra.launcher.timeout_min == 240 and cfg.hydra.launcher.array_parallelism == 32
        assert cfg.hydra.launcher.gpus_per_node == 1 and "partition" in cfg.hydra.launcher


@pytest.mark.parametrize("method", options("method"))
def test_debug_fast_has_a_short_setting_for_every_method(compose, method):
    """debug=fast sets method keys per method (conf/debug_method/fast_<method>.yaml): each method has one,
    and it shortens the job (fewer guided steps or iterations than the method's own config)."""
    assert (CONF_DIR / "debug_method" / f"fast_{method}.yaml").exists()
    full, fast = compose([f"method={method}"]), compose([f"method={method}", "debug=fast"])
    shorter = [k for k in ("tau", "iterations", "start", "augmentations", "strength")
               if k in fast.method and fast.method[k] < full.method[k]]
    assert shorter and fast.dataset.num_images == 4
