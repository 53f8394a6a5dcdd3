"""The Hydra configs (a package, so that Hydra finds them as ``pkg://anogan_lightning.conf``
when an entry point is imported rather than run as ``__main__``, e.g. by ``anogan-lightning``)."""
