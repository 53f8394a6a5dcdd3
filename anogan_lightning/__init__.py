"""anogan_lightning: unsupervised anomaly detection in retinal OCT on PyTorch Lightning + Hydra."""

from pathlib import Path

__version__ = "0.2.0"  # = pyproject.toml's version

#: the Hydra configs, shipped inside the package (``anogan_lightning/conf/``)
CONF_DIR = Path(__file__).resolve().parent / "conf"


def available_methods() -> list[str]:
    """The names of the method configs, ``conf/method/<name>.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
