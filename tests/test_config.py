"""Every shipped config composes and builds every part with the job's one builder (``cfx_cli.job.build.JobParts``)
on the CPU: the synthetic benchmark's parts for real, a released model's weights (absent offline) as the one-line
error naming its key. And the layout rules: options do not restate their name or key, the dataset's image_size
follows the generative model, a method picks its paper's sampler grid from conf/sampler/, `_global_` only where
Hydra needs it; tuned values come from the tuning files (compared with the files, not restated here)."""
from __future__ import annotations

import copy
import importlib.util
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from cfx_cli import CONF_DIR, ZOO_DIR
from cfx_cli.errors import user_error
from cfx_cli.job.build import JobParts, NeedsFailedPart, fit_defaults

TIMM = importlib.util.find_spec("timm") is not None
GROUPS = ["dataset", "classifier", "regressor", "robust_model", "diffusion", "sampler", "method", "target", "metrics",
          "debug"]


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def conf_files():
    return sorted(p for p in CONF_DIR.rglob("*.yaml") if "hydra" not in p.relative_to(CONF_DIR).parts)


# ------------------------------------------------------------------------------------ composing and building
# The parts of a job, as JobParts names them, and the config group each is recorded under when it fails.
PARTS = {"dataset": "dataset", "model": None, "objective": "target", "generative": "diffusion", "sampler": "sampler",
         "robust_model": "robust_model", "method": "method", "oracle": "metrics.oracle"}
# The key naming each part's file: a released model's weights, absent on this machine.
WEIGHTS = {"classifier.path": "model", "regressor.path": "model", "robust_model.path": "robust_model",
           "diffusion.path": "generative"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A few images in each dataset's released layout (the datasets build for real)."""
    from test_celeba import write_celeba
    from test_celebahq import write_celebahq

    root = tmp_path_factory.mktemp("data")
    write_celeba(root / "celeba")
    write_celebahq(root / "celebahq")
    rng = np.random.default_rng(0)
    for folder in ("imagenet/n01440764", "imagenet/n01443537", "folder/a", "folder/b"):  # ImageNet: tench, goldfish
        (root / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / folder / f"{i}.JPEG")
    (root / "table.csv").write_text("source,target\n0,1\n1,0\n")  # a target table for the 2-class classifier
    return root


def compose_filled(compose, overrides, data, absent):
    """The config of `cfx run OVERRIDES` with each ``???`` filled: a dataset root with tiny data, a weight file
    with a path under ``absent`` (no such file: a released model this machine does not have); returns the
    config and {part: the start of its expected one-line error} for the absent weights."""
    cfg = compose(overrides)
    fill, missing = [], {}
    for key in ("dataset.root", "classifier.arch", *WEIGHTS):
        node, _, leaf = key.rpartition(".")
        if cfg.get(node) is None or not OmegaConf.is_missing(cfg[node], leaf):
            continue
        if key == "dataset.root":
            kind = cfg.dataset._target_.rsplit(".", 1)[1].removesuffix("Dataset").lower()
            fill.append(f"dataset.root={data / kind}")
        elif key == "classifier.arch":
            fill.append("classifier.arch=resnet18")
        else:
            fill.append(f"{key}={absent / key}.pt")
            missing[WEIGHTS[key]] = f"{key}={absent / key}.pt does not exist"
    if cfg.classifier._target_.endswith("timm_classifier") and not cfg.get("regressor") and not TIMM:
        missing["model"] = "classifier=timm needs timm: pip install timm"  # an optional dependency, not here
    return (compose([*overrides, *fill]) if fill else cfg), missing


def build_every_part(cfg):
    """Each part built as the job builds it (``fit_defaults`` first, as `cfx run`): {part: object or exception}."""
    fit_defaults(cfg)
    parts = JobParts(cfg, torch.device("cpu"))
    built = {}
    for name in PARTS:
        try:
            built[name] = getattr(parts, name)
        except Exception as e:  # noqa: BLE001 - judged below
            built[name] = e
    if not any(isinstance(v, Exception) for v in built.values()):
        built["image size"] = parts.match_dataset()
    return built, parts.model_key


def check_built(built, model_key, missing):
    """The parts of absent weights fail with the one-line error naming their key; the parts that need them are
    not built (NeedsFailedPart names parts that were not built); every other part is built."""
    groups = {**PARTS, "model": model_key}
    unbuilt = {groups[name] for name, value in built.items() if isinstance(value, Exception)}
    for name, value in built.items():
        if name in missing:
            message = user_error(value) if isinstance(value, Exception) else None
            assert message and message.startswith(missing[name]) and "\n" not in message, (name, missing[name], value)
        elif isinstance(value, NeedsFailedPart):
            assert set(value.names) <= unbuilt, (name, value.names, unbuilt)
        else:
            assert not isinstance(value, Exception), (name, user_error(value) or repr(value))


def option_overrides(group, option, data):
    """``group=option`` and the context it needs: a regression target takes a regressor, a latent or Diff-AE
    model its method, a DDIM grid a DDIM method; a user's diffusers DDPM is the shipped one's folder."""
    extra = {("target", "absolute"): ["regressor=synthetic_size"], ("target", "shift"): ["regressor=synthetic_size"],
             ("target", "young_old"): ["regressor=synthetic_size"],
             ("target", "table"): [f"target.table={data}/table.csv"],
             ("diffusion", "synthetic_diffae"): ["method=diffae"], ("diffusion", "diffae_ffhq256"): ["method=diffae"],
             ("diffusion", "synthetic_ldm"): ["method=ldce"], ("diffusion", "ldm_cin256"): ["method=ldce"],
             ("diffusion", "stable_diffusion"): ["method=ldce"],
             ("diffusion", "diffusers_ddpm"): [f"diffusion.path={ZOO_DIR / 'synthetic_ddpm'}"],
             ("sampler", "ddim"): ["method=ldce"], ("sampler", "ldm500"): ["method=ldce"],
             ("sampler", "ddim10"): ["method=diffae"]}
    return [f"{group}={option}", *extra.get((group, option), [])]


def sweep_points(exp):
    """The jobs of an experiment's own sweep (hydra.sweeper.params), seeds aside."""
    params = (yaml.safe_load((CONF_DIR / "experiment" / f"{exp}.yaml").read_text()).get("hydra") or {}) \
        .get("sweeper", {}).get("params", {})
    grid = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items() if k != "seed"]
    return [list(p) for p in itertools.product(*grid)] if grid else [[]]


CASES = [(f"{g}={o}", ("option", g, o)) for g in GROUPS for o in options(g)]
CASES += [(f"debug=fast method={m}", ("debug", m)) for m in options("method")]
CASES += [(f"experiment={e} {' '.join(p)}".strip(), ("experiment", e, tuple(p)))
          for e in options("experiment") for p in sweep_points(e)]


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_every_config_builds(compose, data, tmp_path, case, one_thread):
    if case[0] == "option":
        overrides = option_overrides(*case[1:], data)
    elif case[0] == "debug":
        overrides = ["debug=fast", f"method={case[1]}"]
    else:
        overrides = [f"experiment={case[1]}", *case[2]]
    cfg, missing = compose_filled(compose, overrides, data, tmp_path / "absent")
    OmegaConf.resolve(copy.deepcopy(cfg))  # every interpolation resolves
    built, model_key = build_every_part(cfg)
    check_built(built, model_key, missing)
    if not missing:  # the synthetic benchmark's parts: every one real, at the generative model's resolution
        assert built["image size"] == cfg.dataset.image_size == built["generative"].image_size


def test_every_tuning_file_is_reached_and_builds(compose, data, tmp_path, one_thread):
    """conf/tuning/<method>_<diffusion>.yaml and conf/tuning_regressor/<method>_<diffusion>_<regressor>.yaml:
    each is chosen by its combination, its values are the composed ones, and the job builds."""
    methods, diffusions, regressors = options("method"), options("diffusion"), options("regressor")
    for group in ("tuning", "tuning_regressor"):
        for name in options(group):
            m = next(m for m in sorted(methods, key=len, reverse=True) if name.startswith(m + "_"))
            rest = name[len(m) + 1:]
            d = next(d for d in diffusions if rest == d or rest.startswith(d + "_"))
            overrides = [f"method={m}", f"diffusion={d}"] + ([f"regressor={rest[len(d) + 1:]}"] if rest != d else [])
            cfg = compose(overrides)
            file = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
            tuned = file if "method" not in file else file.method  # @package method, or _global_ with sampler keys
            assert {k: cfg.method[k] for k in tuned} == OmegaConf.to_container(tuned), name
            if "sampler" in file:
                assert cfg.sampler.steps == file.sampler.steps, name
            built, model_key = build_every_part(compose_filled(compose, overrides, data, tmp_path)[0])
            check_built(built, model_key, {})


# ------------------------------------------------------------------------------------------- layout rules
def test_options_do_not_restate_their_name_or_key():
    """A group's option is named by its file (Hydra's choice) and the builder tells a loader which key named its
    file (<group>.path): neither is restated, in an option or in a _global_ file's group nodes (conf/trainable's
    name is its output folder's, which `cfx train` reads)."""
    restated = []
    for p in conf_files():
        rel = p.relative_to(CONF_DIR)
        if rel.parts[0] == "trainable":
            continue
        content = OmegaConf.load(p)
        nodes = {rel.parts[0]: content, **{g: content[g] for g in GROUPS if OmegaConf.is_dict(content.get(g))}}
        restated += [f"{rel}: {k}" for node in nodes.values() for k in ("name", "key") if k in node]
    assert restated == []


def test_global_only_where_hydra_needs_it():
    """`# @package _global_` only on experiments and debug options (they set keys across groups). A file chosen
    by an interpolated default (a tuning, debug=fast's budget for a method) may set values but not pick a sampler
    option (Hydra's rule), so where it tunes the grid it writes `sampler:` beside `method:`: those are the only two
    nodes it may write, its package is the defaults list's (`@_global_`), never its own header. Method files pick
    their sampler option."""
    interpolated = {"tuning", "tuning_regressor", "debug/fast"}
    for p in conf_files():
        rel = p.relative_to(CONF_DIR)
        text = p.read_text()
        is_global = text.startswith("# @package _global_")
        if str(rel.parent) in interpolated:
            content = OmegaConf.load(p)
            assert "@package" not in text and set(content) <= {"method", "sampler"} and "method" in content, rel
            assert set(content.get("sampler", {})) <= {"steps"}, rel
        elif rel.parts[0] in ("experiment", "debug"):
            assert is_global, rel
        else:
            assert not is_global, rel
        if rel.parts[0] == "method":
            assert "sampler@_global_.sampler" in text, rel
    entries = [next(iter(d)) for d in OmegaConf.load(CONF_DIR / "config.yaml").defaults if not isinstance(d, str)]
    assert {e.split()[-1] for e in entries if "@_global_" in e} == {f"{g.split('/')[0]}@_global_" for g in interpolated}


def hydra_choices(overrides):
    """Hydra's runtime choices of `cfx run OVERRIDES` (which option each group got)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return hydra_compose("config", list(overrides), return_hydra_config=True).hydra.runtime.choices


def test_each_method_runs_on_its_papers_sampler_grid(compose):
    """A method file picks a sampler option (its paper's grid), which is the composed sampler on a model with no
    tuning; on the shipped model, a tuning's grid where the tuning sets one."""
    for m in options("method"):
        picked = hydra_choices([f"method={m}"]).sampler
        assert picked in options("sampler"), m
        option = compose([f"sampler={picked}", "diffusion=diffusers_ddpm", "diffusion.path=/tmp"]).sampler
        untuned = compose([f"method={m}", "diffusion=diffusers_ddpm", "diffusion.path=/tmp"]).sampler
        assert untuned == option, m
        tuning = CONF_DIR / "tuning" / f"{m}_{hydra_choices([f'method={m}']).diffusion}.yaml"
        file = OmegaConf.load(tuning) if tuning.exists() else {}
        steps = file.sampler.steps if "sampler" in file else option.steps
        assert compose([f"method={m}"]).sampler.steps == steps, m


def test_image_size_follows_the_generative_model(compose, tmp_path):
    """Every diffusion option states its resolution and the dataset follows it; no experiment restates it; a
    user's dataset.image_size still wins; a diffusers folder's own size is read when the job starts."""
    for d in options("diffusion"):
        cfg = compose([f"diffusion={d}"] + (["diffusion.path=/tmp"] if d == "diffusers_ddpm" else []))
        assert "image_size" in cfg.diffusion, d
        for ds in options("dataset"):
            assert compose([f"diffusion={d}", f"dataset={ds}"]).dataset.image_size == cfg.diffusion.image_size, (d, ds)
    assert not [e for e in options("experiment") if "image_size" in (OmegaConf.load(
        CONF_DIR / "experiment" / f"{e}.yaml").get("dataset") or {})]
    assert compose(["diffusion=adm_celeba", "dataset.image_size=48"]).dataset.image_size == 48
    # cfx train has no generative model: the synthetic world's own size
    assert compose(["trainable=synthetic_ddpm"], config_name="train").dataset.image_size == 32
    unet = tmp_path / "ddpm" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text('{"sample_size": 48}')
    cfg = compose(["diffusion=diffusers_ddpm", f"diffusion.path={tmp_path / 'ddpm'}"])
    assert cfg.dataset.image_size is None
    fit_defaults(cfg)
    assert cfg.diffusion.image_size == 48 and cfg.dataset.image_size == 48
    assert cfg.metrics.evaluate.attributes.train_labels.image_size == 48


def test_a_wrong_size_names_the_key_to_fix(compose, one_thread):
    from cfx_cli.errors import CfxError

    for overrides, fix in ((["dataset.image_size=48"], "set dataset.image_size=32, or leave it out"),
                           (["diffusion.image_size=48"], "set diffusion.image_size=32 (the dataset follows it)")):
        parts = JobParts(compose(overrides), torch.device("cpu"))
        with pytest.raises(CfxError, match=re.escape(f"dataset.image_size=48 but the diffusion model makes 32×32 "
                                                     f"images: {fix}")):
            parts.match_dataset()


def test_the_builder_names_the_key_of_each_file(tmp_path):
    """Options do not say which key named their file: the builder tells the loader (<group>.<its file argument>),
    so a robust model's error names robust_model.path and a module's weights <group>.weights."""
    from cfx_cli.errors import CfxError
    from cfx_cli.job.build import build_node

    zoo = OmegaConf.create({"_target_": "cfx_cli.models.explained.zoo_model", "path": str(tmp_path / "none"),
                            "task": "classification"})
    module = OmegaConf.create({"_target_": "cfx_cli.models.explained.wrap_module", "task": "regression",
                               "module": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 1},
                               "weights": str(tmp_path / "none.pt")})
    for node, group, key in ((zoo, "robust_model", "robust_model.path"), (zoo, "regressor", "regressor.path"),
                             (module, "regressor", "regressor.weights")):
        with pytest.raises(Exception) as e:
            build_node(node, group)
        cause = e.value.__cause__ if e.value.__cause__ is not None else e.value
        assert isinstance(cause, CfxError) and str(cause).startswith(f"{key}={tmp_path}"), (group, str(cause))


def test_untuned_model_drops_the_perceptual_term_without_its_weights(compose, tmp_path):
    """diffusion.tuned: false (a user's diffusers DDPM): the papers' VGG term is off unless its weights are
    given, with a note; a tuned model (the papers' ADM, the shipped DDPM) keeps the method's values."""
    for m in ("dime", "fastdime"):
        paper = OmegaConf.load(CONF_DIR / "method" / f"{m}.yaml").lambda_perc
        assert paper > 0
        cfg = compose([f"method={m}", "diffusion=diffusers_ddpm", f"diffusion.path={tmp_path}"])
        assert cfg.method.lambda_perc == paper
        notes = fit_defaults(cfg)
        assert cfg.method.lambda_perc == 0 and len(notes) == 1 and "perceptual term is off" in notes[0]
        given = compose([f"method={m}", "diffusion=diffusers_ddpm", f"diffusion.path={tmp_path}",
                         f"method.perceptual_weights={tmp_path}/vgg.pth"])
        assert fit_defaults(given) == [] and given.method.lambda_perc == paper
        adm = compose([f"method={m}", "diffusion=adm_celeba"])
        assert fit_defaults(adm) == [] and adm.method.lambda_perc == paper


def test_choices_are_derived_in_one_place(compose):
    """Option names, now that the files do not restate them: a method class names itself, a dataset or sampler
    class by its kind; a config saved by an older cfx keeps its name key; the run folder takes Hydra's choices."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from cfx_cli.config import choice

    for m in options("method"):
        assert choice(compose([f"method={m}"]), "method") == m
    cfg = compose(["dataset=folder", "dataset.root=/tmp", "method=ldce"])
    assert (choice(cfg, "dataset"), choice(cfg, "sampler"), choice(cfg, "classifier")) == ("folder", "ddim", None)
    assert choice({"method": {"name": "dime", "_target_": "cfx_cli.methods.fastdime.FastDiME"}}, "method") == "dime"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        full = hydra_compose("config", ["method=dime", "dataset=folder", "dataset.root=/tmp"], return_hydra_config=True)
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    hydra_config.set_config(full)  # as while `cfx run` runs
    try:
        assert Path(full.hydra.run.dir).parent == Path("outputs/runs/dime-folder")
    finally:
        hydra_config.cfg = saved


@pytest.mark.parametrize("name", [p.stem for p in (CONF_DIR / "trainable").glob("*.yaml")])
def test_train_configs_compose(compose, name):
    cfg = compose([f"trainable={name}"], config_name="train")
    OmegaConf.resolve(cfg)
    assert cfg.trainable.name == name and Path(cfg.out).name == name


def test_tuning_is_keyed_on_method_and_generative_model(compose):
    """DiME on the shipped DDPM runs its tuning file's values; on a model with no tuning the paper's stand,
    whatever the dataset."""
    paper, tuning = (OmegaConf.load(CONF_DIR / f) for f in ("method/dime.yaml", "tuning/dime_synthetic_ddpm.yaml"))
    cfg = compose(["method=dime"])
    assert (cfg.sampler.steps, cfg.method.tau, cfg.method.lambda_perc) == \
        (tuning.sampler.steps, tuning.method.tau, tuning.method.lambda_perc)
    other = compose(["method=dime", "diffusion=diffusers_ddpm", "diffusion.path=/tmp"])
    assert (other.sampler.steps, other.method.tau, list(other.method.scales)) == \
        (OmegaConf.load(CONF_DIR / "sampler/ddpm.yaml").steps, paper.tau, list(paper.scales))
    assert compose(["method=dime", "dataset=folder", "dataset.root=/tmp"]).method.tau == tuning.method.tau
    assert (tuning.sampler.steps, tuning.method.tau) != (other.sampler.steps, paper.tau)


def test_regressor_alone_switches_the_task(compose):
    from cfx_cli.job.build import explained_model

    cfg = compose(["regressor=synthetic_size"])
    assert cfg.classifier is not None  # no need to unset it
    model, key = explained_model(cfg)
    assert key == "regressor" and model.task == "regression"
    # Regression guidance scales come from conf/tuning_regressor, for either method; a user's own
    # diffusion model has no tuning and keeps the method's paper scales.
    def tuned(path):
        file = OmegaConf.load(CONF_DIR / path)
        return list((file.method if "method" in file else file).scales)

    assert list(cfg.method.scales) == tuned("tuning_regressor/fastdime_synthetic_ddpm_synthetic_size.yaml")
    assert list(compose(["regressor=synthetic_size", "method=dime"]).method.scales) == \
        tuned("tuning_regressor/dime_synthetic_ddpm_synthetic_size.yaml")
    assert list(compose(["method=dime"]).method.scales) == tuned("tuning/dime_synthetic_ddpm.yaml")
    assert tuned("tuning_regressor/dime_synthetic_ddpm_synthetic_size.yaml") != tuned("tuning/dime_synthetic_ddpm.yaml")
    assert list(compose(["regressor=synthetic_size", "diffusion=diffusers_ddpm", "diffusion.path=/tmp"]).method.scales) \
        == tuned("method/fastdime.yaml")


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
    """debug=fast sets method keys per method (conf/debug/fast/<method>.yaml): each method has one, its values
    are the composed ones, and it shortens the job (fewer guided steps or iterations)."""
    file = CONF_DIR / "debug" / "fast" / f"{method}.yaml"
    assert file.exists()
    full, fast = compose([f"method={method}"]), compose([f"method={method}", "debug=fast"])
    short = OmegaConf.load(file).method
    assert {k: fast.method[k] for k in short} == OmegaConf.to_container(short)
    shorter = [k for k in ("tau", "iterations", "start", "augmentations", "strength")
               if k in fast.method and fast.method[k] < full.method[k]]
    assert shorter and fast.dataset.num_images == 4
