"""Optional dependencies (the pyproject extras): import one, or stop with one line naming the
extra that installs it.

The core install trains, evaluates and reports on Kermany and synthetic data; everything else
is an extra: ``sweeps`` (Optuna sweeper), ``slurm`` (submitit launcher), ``volumes`` (eyepy,
nibabel, tifffile), ``export`` (onnx, onnxruntime, onnxscript), ``wandb`` and ``tensorboard``
(``logger=wandb``, ``logger=tensorboard``; the default logger is CSV). Modules of an extra are
imported where a feature needs them, through :func:`require`, never at the top of a module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from omegaconf import OmegaConf

from anogan_lightning import CONF_DIR

#: top-level module -> (pip distribution, extra)
EXTRAS: dict[str, tuple[str, str]] = {
    "eyepy": ("eyepy", "volumes"),
    "nibabel": ("nibabel", "volumes"),
    "tifffile": ("tifffile", "volumes"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "onnxscript": ("onnxscript", "export"),
    "hydra_plugins.hydra_optuna_sweeper": ("hydra-optuna-sweeper", "sweeps"),
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", "slurm"),
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard"),
}

#: Hydra config-group options that need a module of an extra (a Hydra plugin, a logger's
#: library) -> that module
PLUGIN_OPTIONS: dict[tuple[str, str], str] = {
    ("hydra/sweeper", "optuna"): "hydra_plugins.hydra_optuna_sweeper",
    ("hydra/launcher", "submitit_slurm"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/launcher", "submitit_local"): "hydra_plugins.hydra_submitit_launcher",
    ("logger", "wandb"): "wandb",
    ("logger", "tensorboard"): "tensorboard",
}


class MissingExtraError(ImportError):
    """A feature's optional dependency is not installed; the message names the extra."""


def _key(module: str) -> str:
    """The :data:`EXTRAS` entry that ``module`` belongs to (itself or a parent package)."""
    for name in EXTRAS:
        if module == name or module.startswith(name + "."):
            return name
    top = module.split(".", 1)[0]
    if top in EXTRAS:
        return top
    raise KeyError(f"{module} belongs to no extra")


def message(module: str, feature: str) -> str:
    dist, extra = EXTRAS[_key(module)]
    return f"{feature} needs {dist}: pip install 'anogan-lightning[{extra}]'"


def require(module: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming the extra when
    the module (or its package) is not installed. ``feature`` says what needed it, e.g.
    ``"reading .vol"``. An installed module that fails on a missing dependency of its own
    raises that error as it is (a broken install, not a missing extra)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        key = _key(module)
        if err.name is None or not (
            key == err.name or key.startswith(err.name + ".") or err.name.startswith(key + ".")
        ):
            raise
        raise MissingExtraError(message(module, feature)) from err


def _override_options(arg: str) -> list[tuple[str, str]]:
    """(group, option) pairs a command-line override selects: ``+sweep=optuna``,
    ``hydra/launcher=slurm``, ``override hydra/sweeper=optuna``; [] for a plain value."""
    if "=" not in arg:
        return []
    key, value = arg.split("=", 1)
    key = key.lstrip("+~").removeprefix("override ").strip().lstrip("/")
    if "." in key:  # method.width=8: a value, not a group choice
        return []
    return [(key, v.strip()) for v in value.split(",") if v.strip()]


def _config_defaults(group: str, option: str) -> list[tuple[str, str]]:
    """(group, option) pairs that ``conf/<group>/<option>.yaml`` selects in its defaults."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return []
    defaults = OmegaConf.load(path).get("defaults") or []
    out = []
    for entry in defaults:
        if isinstance(entry, str):  # `- submitit_slurm`: an option of the same group
            if entry != "_self_" and "/" not in entry:
                out.append((group, entry))
        else:
            for k, v in dict(entry).items():
                k = str(k).removeprefix("override ").strip()
                k = k.lstrip("/") if k.startswith("/") else f"{group}/{k}"
                out.append((k, str(v)))
    return out


def missing_for_overrides(args: list[str]) -> str | None:
    """The one-line error for the first Hydra plugin that the command-line overrides need and
    that is not installed (e.g. ``+sweep=optuna`` without the ``sweeps`` extra), else None.

    Checked before Hydra composes, whose own error for a missing plugin ("Could not find
    'hydra/sweeper/optuna'") does not say what to install.
    """
    for arg in args:
        for group, option in _override_options(arg):
            for choice in [(group, option), *_config_defaults(group, option)]:
                module = PLUGIN_OPTIONS.get(choice)
                if module is None:
                    continue
                try:
                    require(module, f"{arg} ({'/'.join(choice)})")
                except MissingExtraError as err:
                    return str(err)
    return None
