"""Every method in conf/method/*.yaml ranks planted lesions above normals on easy synthetic data.

A method at chance fails here. Easy setting: larger lesions (``lesion_scale=1.5``), calmer
anatomy (``shape_variability=0.5``), 32x32, tiny networks (width 8), a training length per
method chosen so that three seeds (0, 1, 2) pass with room to spare, checked once offline
(experiments/notes/2026-11-30-quality-tests.md). The threshold is the same for every method:
test AUROC >= 0.8. A method that cannot reach it with tiny settings is marked
``xfail(strict=True)`` with the reason, never given a lower threshold.
"""

from __future__ import annotations

import pytest
from conftest import METHODS, compose_cfg

from anogan_lightning import method_config
from anogan_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

THRESHOLD = 0.8
EASY_DATA = [
    "data.image_size=32",
    "data.n_val=64",
    "data.n_test=128",
    "data.eval_batch_size=128",
    "data.lesion_scale=1.5",
    "data.shape_variability=0.5",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
    "figures=false",
]
# training length and network size per method; a method without an entry gets DEFAULT
DEFAULT = {
    "data.n_train": 512,
    "data.batch_size": 32,
    "trainer.max_epochs": 8,
    "method.width": 8,
    "method.progress": False,
}
SETTINGS: dict[str, dict] = {
    "autoencoder": {"data.n_train": 256},
    "pix2pix_latent": {"data.lesion_scale": 2.0},  # its latent score needs larger lesions
    "sparse_gan": {"data.lesion_scale": 2.0},  # so does its (drusen: 0.37-0.99 at 1.5)
    "acae": {"trainer.max_epochs": 24},
    "anogan": {
        "data.n_train": 640,
        "data.batch_size": 64,
        "trainer.max_epochs": 30,
        "method.mapping_steps": 30,
        "method.mapping_restarts": 8,
    },
    "ganr": {
        "data.n_train": 640,
        "data.batch_size": 64,
        "trainer.max_epochs": 30,
        "method.mapping_steps": 30,
    },
    "fanogan": {
        "trainer.max_epochs": -1,  # the stage lengths end the fit
        "data.n_train": 256,
        "method.gan_steps": 50,
        "method.encoder_steps": 50,
    },
}
# methods whose pixel anomaly maps must also point at the lesions (pixel AUROC above this)
PIXEL_FLOOR = {"anogan": 0.6}
XFAIL: dict[str, str] = {
    "acae": "at seed 0 the discrimination term D ranks lesions below normals (AUROC 0.31-0.35 "
    "at 1 and 2 threads, with D's batch-norm statistics recalibrated on training normals) and "
    "drusen images below normals (class AUROC of A 0.04-0.08), which drags A = 0.9 R + 0.1 D to "
    "0.76 although the residual R alone reaches 0.85; seed 1 passes (0.92-0.94), seed 2 varies "
    "with the thread count (0.63-0.92)",
    "fanogan": "WGAN-GP + izi_f does not get there with tiny settings: with the method "
    "config's DCGAN networks and one critic update per generator update, at 50 + 50 "
    "iterations the residual A_R reaches 0.67-0.82 over seeds 0-2 but the critic-feature term "
    "A_D ranks drusen below normals (A_D 0.49-0.66, drusen class of A 0.13-0.30), so "
    "A = A_R + A_D is 0.60-0.69; at 400 + 200 A_R is 0.83-0.94 and A 0.56-0.89",
}


def quality_overrides(method: str) -> list[str]:
    keys = set(method_config(method))
    settings = DEFAULT | SETTINGS.get(method, {})
    out = [f"+method={method}", *EASY_DATA]
    for k, v in settings.items():
        if not k.startswith("method.") or k.removeprefix("method.") in keys:
            out.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ranks_planted_lesions_above_normals(method: str, tmp_path, request):
    if method in XFAIL:
        request.applymarker(pytest.mark.xfail(strict=True, reason=XFAIL[method]))
    results = run(compose_cfg(quality_overrides(method), tmp_path))
    aurocs = {k: round(v, 3) for k, v in results.items() if "auroc" in k and "_ci_" not in k}
    assert results["test/auroc"] >= THRESHOLD, aurocs
    if method in PIXEL_FLOOR:
        assert results["test/pixel_auroc"] > PIXEL_FLOOR[method], aurocs
