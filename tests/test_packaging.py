"""The package as users install and run it: the ``anogan-lightning <verb>`` command, configs of
their own through Hydra's search path, run folders named by method and data, and a wheel that,
installed alone, trains, tests, predicts and exports from a directory outside the checkout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, REPO, TINY_DATA
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import anogan_lightning
from anogan_lightning import cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY_AE = [*TINY_DATA, "data.image_size=16", "method.width=8"]
STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")


def test_version_is_pyprojects():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == anogan_lightning.__version__


def test_help_lists_the_verbs(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "predict", "export", "report", "quality", "model-card"):
        assert re.search(rf"^  {verb} ", out, re.M), verb
    assert ("calibrate" in out) == (
        cli.importlib.util.find_spec(cli.VERBS["calibrate"][0]) is not None
    )


def test_unknown_and_absent_verbs_fail_with_one_line(capsys, monkeypatch):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'trian' is not a verb" in err[0] and "train" in err[0]
    monkeypatch.setitem(cli.VERBS, "calibrate", ("anogan_lightning.no_such_module", "x"))
    assert cli.main(["calibrate"]) == 2
    assert "'calibrate' is not part of this install" in capsys.readouterr().err


def test_a_new_verb_is_one_line_and_gets_the_rest_of_the_command_line(tmp_path, monkeypatch):
    """The extension point (e.g. calibrate): a module with main(argv) and one VERBS entry."""
    (tmp_path / "my_verb.py").write_text("def main(argv):\n    print(argv)\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.VERBS, "mine", ("my_verb", "a verb of my own"))
    assert "a verb of my own" in cli.usage()
    assert cli.main(["mine", "a=1", "--flag"]) == 3


def test_logger_without_its_extra_stops_with_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert cli.main(["train", "+method=autoencoder", "logger=wandb"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: logger=wandb (logger/wandb) needs wandb: pip install 'anogan-lightning[wandb]'"
    ]


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _user_conf(root: Path) -> Path:
    """A user's config folder: method/mymethod.yaml (the auto-encoder, width 8) and
    experiment/myexp.yaml, which brings that method through its defaults."""
    conf = root / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "experiment").mkdir()
    method = OmegaConf.load(CONF / "method/autoencoder.yaml")
    method.method.width = 8
    (conf / "method/mymethod.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(method))
    (conf / "experiment/myexp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /method: mymethod\nmethod:\n  width: 4\n"
    )
    return conf


def test_experiment_configs_name_their_methods_run_folder(tmp_path: Path):
    """The run folder takes the method from Hydra's choices: +method=, or the method an
    experiment config brings in its defaults (also from a user's search path)."""
    conf = _user_conf(tmp_path)
    search = f"hydra.searchpath=[file://{conf}]"
    cases = {
        ("+experiment=cross_device",): ("autoencoder", "kermany"),
        ("+experiment=cross_device", "method=acae"): ("acae", "kermany"),
        ("+experiment=isbi2020_fanogan",): ("fanogan", "kermany"),
        ("+experiment=myexp", search): ("mymethod", "synthetic"),
        ("+method=mymethod", search, "data=kermany"): ("mymethod", "kermany"),
    }
    for overrides, (method, data) in cases.items():
        cfg = _compose(list(overrides))
        choices = cfg.hydra.runtime.choices
        assert (choices.method, choices.data) == (method, data), overrides
    cfg = _compose(["+experiment=myexp", search])
    assert cfg.method.width == 4  # the experiment's own value over its method's
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    assert run_dir.startswith("${paths.log_dir}/runs/${oc.select:hydra.runtime.choices.method,")


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "anogan_lightning.cli", *args],
        cwd=cwd,
        env={**env, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_run(root: Path, method: str, data: str) -> Path:
    runs = list((root / "runs" / method / data).iterdir())
    assert len(runs) == 1 and STAMP.fullmatch(runs[0].name), runs
    return runs[0]


@pytest.mark.slow
def test_a_method_yaml_from_the_users_folder_trains(tmp_path: Path):
    """`+method=mymethod hydra.searchpath=[file://<folder>]` finds <folder>/method/mymethod.yaml;
    the run goes to outputs/runs/mymethod/synthetic/<date>_<time>."""
    conf = _user_conf(tmp_path)
    proc = _cli("train", "+method=mymethod", f"hydra.searchpath=[file://{conf}]",
                *TINY_AE[:-1], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _one_run(tmp_path / "outputs", "mymethod", "synthetic")
    assert json.loads((run / "results.json").read_text())["method"] == "AutoEncoder"
    assert OmegaConf.load(run / "config.yaml").method.width == 8  # the user's yaml
    # the recorded command reruns the job: the entry point's module, not the dispatcher
    cmd = json.loads((run / "results.json").read_text())["provenance/command"]
    assert cmd.startswith("python -m anogan_lightning.train +method=mymethod"), cmd


def _wheel_site(tmp_path: Path) -> Path:
    """The wheel built from the checkout's files, installed alone into <tmp>/site."""
    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info where it runs
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "anogan_lightning",
        src / "anogan_lightning",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    cmd = [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(wheels)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("anogan_lightning-*.whl")
    assert wheel.name.startswith(f"anogan_lightning-{anogan_lightning.__version__}-")
    site = tmp_path / "site"
    cmd = [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return site


@pytest.mark.slow
def test_the_wheel_alone_trains_predicts_and_exports_from_anywhere(tmp_path: Path):
    import numpy as np
    from PIL import Image

    from anogan_lightning.data.synthetic import make_split

    site = _wheel_site(tmp_path)
    assert (site / "anogan_lightning/conf/train.yaml").is_file()  # the configs ship inside
    assert (site / "anogan_lightning/conf/debug/fast_dev_run.yaml").is_file()
    work = tmp_path / "elsewhere"  # outside the checkout, no conf/ folder
    work.mkdir()
    # the installed wheel ahead of site-packages (where the checkout may be installed
    # in editable mode): PYTHONPATH holds the target only
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import anogan_lightning; print(anogan_lightning.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(site)), where.stdout
    command = site / "bin/anogan-lightning"  # the console script of [project.scripts]

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(command), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{args[0]}: {proc.stderr[-3000:]}"
        return proc

    assert "predict" in run("--help").stdout
    run("train", "+method=autoencoder", *TINY_AE)
    out = _one_run(work / "outputs", "autoencoder", "synthetic")
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test/auroc"] <= 1 and results["provenance/version"] == "0.2.0"
    ckpt = out / "checkpoints/model.ckpt"

    scans = work / "scans"
    scans.mkdir()
    ds = make_split(3, 64, "test", seed=3)
    for i in range(3):
        img = ((ds.images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(img).save(scans / f"scan_{i}.png")
    run("predict", f"ckpt={ckpt}", f"input={scans}", "heatmaps=false", "output_dir=pred")
    rows = (work / "pred/predictions.csv").read_text().splitlines()
    assert len(rows) == 4 and all(",ok," in r for r in rows[1:])

    run("export", f"ckpt={ckpt}", "format=torchscript", "out=exported/model.pt")
    assert (work / "exported/model.pt").is_file()
    assert json.loads((work / "exported/model.pt.json").read_text())["parity"]
    card = (work / "exported/MODEL_CARD.md").read_text()
    assert f"{results['test/auroc']:.4f}" in card
