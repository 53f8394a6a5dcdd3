"""anogan_lightning: unsupervised anomaly detection in retinal OCT on PyTorch Lightning + Hydra."""

from pathlib import Path

__version__ = "0.2.0"  # = pyproject.toml's version

#: the Hydra configs, shipped inside the package (``anogan_lightning/conf/``)
CONF_DIR = Path(__file__).resolve().parent / "conf"


def available_methods() -> list[str]:
    """The names of the method configs, ``conf/method/<name>.yaml`` (``conf/method/base/``
    holds what several of them share: not methods of their own)."""
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def method_config(name: str):
    """The ``method`` node of ``+method=<name>`` as a run composes it (defaults lists merged,
    interpolations such as ``${data.image_size}`` left unresolved): a method config may inherit
    its keys from another (``denoising_autoencoder`` from ``autoencoder``), so reading its yaml
    file alone does not give them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path
        return compose("train", overrides=[f"+method={name}"]).method
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"+method={name}"]).method
