"""One command for every job: ``anogan-lightning <verb> [arguments]``.

Each verb is a module of the package with a ``main()``; the rest of the command line goes to
it unchanged: Hydra overrides for the Hydra entry points (train, predict, export), options for
the others (report, quality, model-card). ``anogan-lightning <verb> --help`` is the module's
own help; ``anogan-lightning train +method=autoencoder`` is
``python -m anogan_lightning.train +method=autoencoder``.

A new verb is one line in :data:`VERBS`: (module, one-line summary), and its name in
:data:`HYDRA_VERBS` when its ``main`` is a ``@hydra.main``. A verb whose module is not part of
this install is left out of the help and refused with a one-line error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

#: verb -> (module with a ``main()``, summary for ``--help``)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("anogan_lightning.train", "fit, validate and test: +method=<name> [overrides]"),
    "predict": ("anogan_lightning.predict", "score new scans: ckpt=<model> input=<file|folder>"),
    "export": (
        "anogan_lightning.export",
        "export a scorer: ckpt=<model.ckpt> format=onnx|torchscript",
    ),
    "report": ("anogan_lightning.report", "compare finished runs: <sweep dir | run dirs...>"),
    "quality": ("anogan_lightning.quality", "the seeded quality benchmark (hours on a CPU)"),
    "model-card": ("anogan_lightning.model_card", "write MODEL_CARD.md for a checkpoint"),
    "calibrate": (
        "anogan_lightning.calibrate",
        "a site-calibrated model: ckpt=<model.ckpt> normals=<folder | list.csv>",
    ),
}
#: verbs whose ``main`` is a ``@hydra.main`` (reads ``sys.argv``; returns nothing useful)
HYDRA_VERBS = ("train", "predict", "export", "calibrate")


def available() -> dict[str, tuple[str, str]]:
    """The verbs whose module this install has."""
    return {v: m for v, m in VERBS.items() if importlib.util.find_spec(m[0]) is not None}


def usage() -> str:
    verbs = available()
    width = max(map(len, verbs))
    lines = [
        "usage: anogan-lightning <verb> [arguments]",
        "",
        "Unsupervised anomaly detection in retinal OCT. Verbs:",
        *(f"  {v:<{width}}  {summary}" for v, (_, summary) in verbs.items()),
        "",
        "anogan-lightning <verb> --help shows a verb's own options (Hydra's for train, predict,",
        "export). Your own method/data/experiment yamls: put them in <dir>/method/<name>.yaml",
        "etc. and add hydra.searchpath=[file:///abs/path/to/<dir>] to the train command.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from anogan_lightning import __version__

        print(f"anogan-lightning {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    verbs = available()
    if verb not in verbs:
        known = ", ".join(verbs)
        why = "is not part of this install" if verb in VERBS else "is not a verb"
        print(f"error: {verb!r} {why}; one of: {known} (anogan-lightning --help)", file=sys.stderr)
        return 2
    if verb in HYDRA_VERBS:
        from anogan_lightning import extras

        # e.g. +sweep=optuna or logger=wandb without its extra: one line, before Hydra composes
        if (missing := extras.missing_for_overrides(rest)) is not None:
            print(f"error: {missing}", file=sys.stderr)
            return 1
    name = verbs[verb][0]
    module = importlib.import_module(name)
    if verb not in HYDRA_VERBS:
        sys.argv = [f"anogan-lightning {verb}", *rest]  # argparse's prog
        return int(module.main(rest) or 0)
    # run as `python -m <module>` would: Hydra reads sys.argv; the recorded command
    # (provenance) and Lightning's DDP launcher, which starts each further process with
    # `python -m <__main__.__spec__.name> <sys.argv[1:]>`, read __main__'s spec
    main_module = sys.modules["__main__"]
    saved = sys.argv, getattr(main_module, "__spec__", None)
    spec = importlib.util.find_spec(name)
    sys.argv, main_module.__spec__ = [spec.origin, *rest], spec
    try:
        module.main()
    finally:
        sys.argv, main_module.__spec__ = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
