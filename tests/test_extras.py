"""Light installs: the package and the synthetic main job need no extra; a feature whose extra
is missing stops with one line naming it. A missing package is simulated by
``sys.modules[name] = None`` (import then fails as for an uninstalled one)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, compose_cfg

from anogan_lightning import extras
from anogan_lightning.extras import MissingExtraError

# every module of every extra, and what they pull in
BLOCKED = [
    "eyepy",
    "nibabel",
    "tifffile",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "optuna",
    "submitit",
    "hydra_plugins.hydra_optuna_sweeper",
    "hydra_plugins.hydra_submitit_launcher",
    "wandb",
    "tensorboard",
    "skimage",  # a dev extra (a test's reference), never imported by the package
]
BLOCK = f"import sys\nfor _m in {BLOCKED!r}:\n    sys.modules[_m] = None\n"


def _python(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_package_and_synthetic_main_job_need_no_extra(tmp_path: Path):
    code = f"""
    import importlib, math, pkgutil
    from pathlib import Path
    import anogan_lightning
    for mod in pkgutil.walk_packages(anogan_lightning.__path__, "anogan_lightning."):
        importlib.import_module(mod.name)  # every module imports without an extra
    sys.path.insert(0, {str(REPO / "tests")!r})
    from conftest import compose_cfg, tiny_overrides
    from anogan_lightning.train import run
    results = run(compose_cfg(tiny_overrides("anogan"), Path("run")))
    assert math.isfinite(results["test/auroc"]), results
    for name in {BLOCKED!r}:
        assert sys.modules[name] is None, name  # still blocked: nothing got around the block
    print("OK")
    """
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    assert (tmp_path / "run/checkpoints/model.ckpt").is_file()
    assert (tmp_path / "run/results.json").is_file()


def test_sweep_without_its_extra_stops_with_one_line(tmp_path: Path):
    code = """
    import runpy
    sys.argv = ["train", "-m", "+sweep=optuna"]
    runpy.run_module("anogan_lightning.train", run_name="__main__")
    """
    proc = _python(code, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (  # one line, nothing else
        "error: +sweep=optuna (hydra/sweeper/optuna) needs hydra-optuna-sweeper: "
        "pip install 'anogan-lightning[sweeps]'"
    )
    assert not (tmp_path / "outputs").exists()  # stopped before Hydra started a job


def test_launcher_without_its_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    for args in (["hydra/launcher=slurm"], ["hydra/launcher=submitit_local"]):
        line = extras.missing_for_overrides(["-m", "+method=anogan", *args])
        assert line is not None and line.startswith(f"{args[0]} (hydra/launcher/submitit_")
        assert line.endswith("needs hydra-submitit-launcher: pip install 'anogan-lightning[slurm]'")


def test_overrides_that_need_no_plugin():
    args = ["+method=anogan", "data=kermany", "method.width=8", "seed=3", "trainer=gpu"]
    assert extras.missing_for_overrides(args) is None
    assert extras.missing_for_overrides(["-m", "+sweep=anogan_seeds"]) is None


def test_installed_plugins_pass_the_check():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    assert extras.missing_for_overrides(["+sweep=optuna", "hydra/launcher=slurm"]) is None


@pytest.mark.parametrize(
    ("suffix", "modules", "dist"),
    [
        (".vol", ["eyepy", "eyepy.io"], "eyepy"),
        (".e2e", ["eyepy", "eyepy.io"], "eyepy"),
        (".nii.gz", ["nibabel"], "nibabel"),
        (".tif", ["tifffile"], "tifffile"),
    ],
)
def test_volume_format_without_its_reader_names_the_extra(
    suffix: str, modules: list[str], dist: str, tmp_path: Path, monkeypatch
):
    from anogan_lightning.data.readers import read_mask, read_volume

    for m in modules:  # also when an earlier test imported it
        monkeypatch.setitem(sys.modules, m, None)
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(b"\0" * 64)
    line = f"reading {suffix} needs {dist}: pip install 'anogan-lightning[volumes]'"
    with pytest.raises(MissingExtraError) as err:
        read_volume(path)
    assert str(err.value) == line
    if suffix != ".vol" and suffix != ".e2e":  # masks come in every format but Heyex's
        with pytest.raises(MissingExtraError, match=r"\[volumes\]"):
            read_mask(path)


def test_predict_stops_on_a_volume_it_cannot_read_without_the_extra(tmp_path: Path, monkeypatch):
    """predict's per-file error rows are for bad files; a missing reader stops the run."""
    import hydra

    from anogan_lightning import predict_volume as pv

    monkeypatch.setitem(sys.modules, "eyepy", None)
    monkeypatch.setitem(sys.modules, "eyepy.io", None)
    cfg = compose_cfg(["+method=autoencoder", "data=oct_volume"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    (tmp_path / "a.vol").write_bytes(b"\0" * 64)
    files = pv.VolumeFiles([tmp_path / "a.vol"], dm, tmp_path / "scratch")
    with pytest.raises(MissingExtraError, match=r"reading \.vol needs eyepy"):
        files[0]


def test_require_keeps_a_broken_install_error(monkeypatch):
    """A missing dependency *of* an installed extra module is not reported as the extra."""

    def broken(name, *a, **k):
        raise ModuleNotFoundError("No module named 'imagecodecs'", name="imagecodecs")

    monkeypatch.setattr(extras.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="imagecodecs") as err:
        extras.require("tifffile", "reading .tif")
    assert not isinstance(err.value, MissingExtraError)
