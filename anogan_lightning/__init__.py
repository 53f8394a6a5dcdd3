"""anogan_lightning: unsupervised anomaly detection in retinal OCT on PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
