"""Every experiment config composes and instantiates; every yaml key is a constructor argument."""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import pytest
from conftest import CONF, METHODS, compose_cfg

from anogan_lightning import extras

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment: str, tmp_path: Path):
    cfg = compose_cfg([f"+experiment={experiment}", "data.root=/data/OCT2017"], tmp_path)
    assert cfg.method._target_
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert model.hparams.image_size == cfg.data.image_size
    data = hydra.utils.instantiate(cfg.data)
    assert data.image_size == cfg.data.image_size  # setup() would read data.root


@pytest.mark.parametrize("method", METHODS)
def test_method_yaml_keys_are_constructor_args(method: str, tmp_path: Path):
    cfg = compose_cfg([f"+method={method}"], tmp_path)
    cls = hydra.utils.get_class(cfg.method._target_)
    params = set(inspect.signature(cls).parameters)
    assert set(cfg.method) - {"_target_"} <= params
    if getattr(cls, "needs_grad_at_test", False):
        assert cfg.trainer.inference_mode is False


@pytest.mark.parametrize("data", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_yaml_keys_are_constructor_args(data: str, tmp_path: Path):
    cfg = compose_cfg(["+method=anogan", f"data={data}"], tmp_path)
    cls = hydra.utils.get_class(cfg.data._target_)
    params = set(inspect.signature(cls).parameters)
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("anogan_lightning"):
            params |= set(inspect.signature(base).parameters)
    assert set(cfg.data) - {"_target_"} <= params - {"kwargs", "loader_kwargs"}


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_sweep_composes(sweep: str, tmp_path: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if (missing := extras.missing_for_overrides([f"+sweep={sweep}"])) is not None:
        pytest.skip(missing)  # a light install without the plugin's extra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
    assert cfg.method._target_ and cfg.hydra.sweeper.params
    cls = hydra.utils.get_class(cfg.method._target_)
    params = set(inspect.signature(cls).parameters)
    swept = {k.split(".", 1)[1] for k in cfg.hydra.sweeper.params if k.startswith("method.")}
    assert swept <= params  # every swept method key is a constructor argument


def test_slurm_launcher_composes(tmp_path: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if (missing := extras.missing_for_overrides(["hydra/launcher=slurm"])) is not None:
        pytest.skip(missing)

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["+method=anogan", "hydra/launcher=slurm", "trainer=ddp"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == -1


DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def test_method_configs_leave_input_size_and_length_to_their_groups():
    """A method yaml setting data.image_size or trainer.max_epochs would silently beat the data
    and trainer groups (it is appended after them)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        plain = compose("train")
        for method in METHODS:  # composed: what a method inherits through its defaults counts
            cfg = compose("train", overrides=[f"+method={method}"])
            assert cfg.data == plain.data, f"conf/method/{method}.yaml sets data.*"
            assert cfg.trainer.max_epochs == plain.trainer.max_epochs, method


@pytest.mark.parametrize("data", ["kermany", "synthetic"])
def test_every_method_gets_the_data_groups_image_size(data: str, tmp_path: Path):
    root = ["data.root=/data/OCT2017"] if data == "kermany" else []
    # the group's own default (kermany.yaml inherits it from bscan_folder.yaml)
    default = compose_cfg([f"data={data}", *root], tmp_path).data.image_size
    sizes = {}
    for method in METHODS:
        cfg = compose_cfg([f"+method={method}", f"data={data}", *root], tmp_path)
        sizes[method] = (cfg.data.image_size, cfg.method.image_size)
    assert set(sizes.values()) == {(default, default)}, sizes


@pytest.mark.parametrize("data", DATA)
def test_every_method_builds_at_the_data_default(data: str, tmp_path: Path):
    for method in METHODS:
        cfg = compose_cfg([f"+method={method}", f"data={data}"], tmp_path)
        model = hydra.utils.instantiate(cfg.method, _convert_="all")
        assert model.hparams.image_size == cfg.data.image_size, method
