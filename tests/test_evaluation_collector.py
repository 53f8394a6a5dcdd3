"""The evaluation of a split (evaluation.collector): window -> B-scan scores, references,
per-split status (ok, partial, not_scored) with its reason, the dataset protocol, and what the
results show of it (results table, scores.csv column order, the thinned W&B ROC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anogan_lightning import artefacts
from anogan_lightning.data.base import ArrayDataset
from anogan_lightning.evaluation import metrics, protocol, stitch
from anogan_lightning.evaluation.collector import Collector

S = 4  # window size of the fake B-scans


class Windows(torch.utils.data.Dataset):
    """Fake windowed B-scans (:class:`protocol.WindowedBScans`): B-scan i is S rows by
    ``widths[i]`` columns, windows S apart; the retina is its middle two rows."""

    def __init__(self, labels: list[int], widths: list[int], aggregate: str = "max") -> None:
        self.labels = torch.tensor(labels)
        self.widths = widths
        self.aggregate, self.top_k, self.has_mask = aggregate, 2, False
        self.coords = [(i, 0, x) for i, w in enumerate(widths) for x in range(0, w - S + 1, S)]

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def image_ids(self) -> list[str]:
        return [f"scan{i}.png" for i in range(len(self.widths))]

    @property
    def image_labels(self) -> torch.Tensor:
        return self.labels

    @property
    def image_shapes(self) -> np.ndarray:
        return np.array([[S, w] for w in self.widths])

    @property
    def window_counts(self) -> np.ndarray:
        return np.bincount([c[0] for c in self.coords], minlength=len(self.widths))

    def image(self, i: int) -> np.ndarray:
        return np.zeros((S, self.widths[i]), np.float32)

    def image_mask(self, i: int) -> None:
        return None

    def image_retina(self, i: int) -> np.ndarray:
        r = np.zeros((S, self.widths[i]), bool)
        r[1:3] = True
        return r

    def restrict_maps(self, maps: np.ndarray) -> np.ndarray:
        return maps

    def thickness_scores(self) -> torch.Tensor:
        return torch.arange(len(self.widths), dtype=torch.float64)


def _run(ds: Windows, window_scores: list[float], n_batches: int | None = None, amap=True):
    """Collect ``ds``'s windows in batches of 2 (the first ``n_batches`` only), window score
    k = window_scores[k], map = the score everywhere; returns the finished evaluation."""
    c = Collector(("other",))
    c.start("test", ds)
    for b, start in enumerate(range(0, len(ds), 2)):
        if n_batches is not None and b >= n_batches:
            break
        k = list(range(start, min(start + 2, len(ds))))
        s = torch.tensor([window_scores[i] for i in k])
        batch = {
            "x": torch.zeros(len(k), 1, S, S),
            "label": ds.labels[[ds.coords[i][0] for i in k]],
            "id": [f"w{i}" for i in k],
            "coords": torch.tensor([ds.coords[i] for i in k]),
        }
        out = {"score": s, "other": -s}
        if amap:
            out["amap"] = s[:, None, None, None].expand(-1, 1, S, S).clone()
        c.collect(batch, out)
    return c.finish()


def test_windows_become_bscans_by_the_rule_with_thickness_as_a_reference():
    ds = Windows([0, 1, 0, 1], [8, 8, 8, 8], aggregate="mean")  # two windows per B-scan
    scores = [1.0, 3.0, 5.0, 7.0, 0.0, 2.0, 6.0, 4.0]
    done = _run(ds, scores)
    rec = done.record
    assert done.metrics["test/status"] == "ok" and "test/reason" not in done.metrics
    torch.testing.assert_close(
        rec["score"], torch.tensor([2.0, 6.0, 1.0, 5.0], dtype=torch.float64)
    )
    assert rec["ids"] == ds.image_ids and rec["labels"].tolist() == [0, 1, 0, 1]
    assert set(rec["references"]) == {"thickness"} and "thickness" not in rec["components"]
    assert rec["columns"] == [
        "other",
        "window_max",
        "window_top2",
        "window_mean",
        "thickness",
        "map_retina",
    ]
    torch.testing.assert_close(
        rec["components"]["window_max"], torch.tensor([3.0, 7, 2, 6], dtype=torch.float64)
    )
    # the reference keeps its AUROC key; the map over the retina is a component
    assert done.metrics["test/auroc_thickness"] == metrics.auroc(torch.arange(4.0), rec["labels"])
    assert done.metrics["test/auroc"] == 1.0 and "test/auroc_map_retina" in done.metrics


def test_the_same_function_scores_one_bscan_in_predict():
    """predict's path: one B-scan, window_to_bscan without the other rules."""
    scores = torch.tensor([0.5, 2.0, 1.0])
    maps = np.full((1, S, 12), 3.0, np.float32)
    maps[0, 1:3] = 8.0  # the retina rows
    retina = Windows([0], [12]).image_retina
    one = stitch.window_to_bscan(
        scores, {"c": -scores}, torch.zeros(3, dtype=torch.long), 1, "topk", 2, maps, retina
    )
    assert float(one.score[0]) == 1.5 and float(one.components["c"][0]) == -0.75
    assert float(one.map_scores["map_retina"][0]) == 8.0 and one.error is None
    by_map = stitch.window_to_bscan(
        scores, {}, torch.zeros(3, dtype=torch.long), 1, "map_retina", 2, maps, retina
    )
    assert float(by_map.score[0]) == 8.0
    none = stitch.window_to_bscan(
        scores, {}, torch.zeros(3, dtype=torch.long), 1, "map_retina", 2, None, retina
    )
    assert "needs an anomaly map" in none.error


def test_cut_off_bscans_are_left_out_and_counted():
    """A batch limit that stops inside a B-scan's windows: the split is scored on its complete
    B-scans (partial), the rest are counted in dropped and named in the reason."""
    ds = Windows([0, 1, 0, 1], [12, 12, 12, 12])  # three windows per B-scan, batches of two
    scores = [1.0, 0, 0, 9, 0, 0, 2, 0, 0, 8, 0, 0]
    done = _run(ds, scores, n_batches=4)  # 8 windows: B-scans 0 and 1 complete, 2 cut off
    m = done.metrics
    assert m["test/status"] == "partial" and m["test/dropped"] == 2
    assert (
        "2 of 4 B-scans left out" in m["test/reason"] and "limit_test_batches" in m["test/reason"]
    )
    assert done.record["ids"] == ["scan0.png", "scan1.png"] and m["test/auroc"] == 1.0
    assert len(done.record["references"]["thickness"]) == 2
    cut = _run(ds, scores, n_batches=1)  # no B-scan complete
    assert cut.metrics["test/status"] == "not_scored" and "test/auroc" not in cut.metrics
    assert "none of the 4 B-scans" in cut.metrics["test/reason"]


def test_one_class_and_no_map_are_not_scored_with_the_reason():
    ds = Windows([0, 0], [8, 8])
    one = _run(ds, [1.0, 2, 3, 4])
    assert one.metrics == {
        "test/status": "not_scored",
        "test/reason": "only normal images (2): the AUROC needs both classes",
    }
    assert one.record["ids"] == ds.image_ids and one.threshold is None  # the scores are kept
    no_map = _run(Windows([0, 1], [8, 8], "map_retina"), [1.0, 2, 3, 4], amap=False)
    assert no_map.metrics["test/status"] == "not_scored"
    assert no_map.metrics["test/reason"].startswith("aggregate=map_retina needs an anomaly map")
    assert no_map.record["ids"] == [] and len(no_map.record["score"]) == 0
    empty = Collector()
    empty.start("val", None)
    assert empty.finish().metrics["val/status"] == "not_scored"


def test_images_not_reached_make_a_partial_split_and_val_sets_the_threshold():
    ds = ArrayDataset(
        torch.zeros(6, 1, S, S), torch.tensor([0, 1, 0, 1, 0, 1]), [f"i{k}" for k in range(6)]
    )
    c = Collector()
    c.start("val", ds)
    c.collect(
        {"x": ds.images[:4], "label": ds.labels[:4], "id": ds.ids[:4]},
        {"score": torch.tensor([0.0, 1, 0.2, 3])},
    )
    done = c.finish()
    assert done.metrics["val/status"] == "partial" and done.metrics["val/dropped"] == 2
    assert done.metrics["val/reason"].startswith("4 of 6 images scored")
    assert done.threshold == done.metrics["val/youden_threshold"] == 1.0


def test_protocol_tells_the_kinds_of_dataset_apart(tmp_path):
    from test_bscan_windows import RETINA, save, scan

    from anogan_lightning.data.bscan.preprocessing import BScanPreprocessing
    from anogan_lightning.data.retina.normalize import RetinaNorm

    paths = [save(tmp_path / f"s{i}.png", scan(w=320 + 64 * i, seed=i)[0]) for i in range(2)]
    prep = BScanPreprocessing(image_size=32, retina=RetinaNorm(**RETINA), window_stride=16)
    grid = prep.eval_dataset(paths, [0, 1], ["N", "D"], None, None)
    grid.preload()
    assert protocol.windowed(grid) and protocol.stitched(grid)
    assert isinstance(grid, protocol.WindowedBScans)
    assert (
        grid.window_counts.tolist()
        == np.bincount([int(grid[k]["coords"][0]) for k in range(len(grid))]).tolist()
    )
    train = prep.train_dataset(paths, [0, 0], ["N", "N"], None, "random", None)
    train.preload()
    assert not protocol.windowed(train)  # training windows: not aggregated
    images = ArrayDataset(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), ["a", "b"])
    assert not protocol.stitched(images) and not isinstance(images, protocol.StitchedImages)


def test_results_table_has_a_status_line_and_the_extra_sets():
    results = {
        "val/status": "ok",
        "val/auroc": 0.9,
        "test/status": "partial",
        "test/reason": "1 of 4 B-scans left out",
        "test/auroc": 0.8,
        "test_duke/status": "not_scored",
        "test_duke/reason": "only normal images (3): the AUROC needs both classes",
        "data/test_duke_normal": 3,
    }
    lines = artefacts.format_table(results).splitlines()
    assert lines[0] == "| metric | val | test | test_duke |"
    assert lines[2] == (
        "| status | ok | partial: 1 of 4 B-scans left out | "
        "not_scored: only normal images (3): the AUROC needs both classes |"
    )
    assert "| auroc | 0.9000 | 0.8000 |  |" in lines


def test_scores_csv_keeps_the_reference_column_where_it_was(tmp_path):
    rec = {
        "ids": ["a", "b"],
        "labels": torch.tensor([0, 1]),
        "score": torch.tensor([0.5, 1.5]),
        "components": {"window_max": torch.tensor([1.0, 2]), "map_retina": torch.tensor([3.0, 4])},
        "references": {"thickness": torch.tensor([0.1, 0.2])},
        "columns": ["window_max", "thickness", "map_retina"],
        "classes": ["N", "D"],
    }
    artefacts.write_scores(tmp_path / "scores.csv", rec)
    assert (tmp_path / "scores.csv").read_text().splitlines() == [
        "id,label,score,window_max,thickness,map_retina,class",
        "a,0,0.5,1,0.1,3,N",
        "b,1,1.5,2,0.2,4,D",
    ]


def test_roc_points_thin_the_curve_not_the_auroc():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(20_000, generator=g) < 0.3).long()
    scores = torch.randn(20_000, generator=g) + labels
    fpr, tpr = metrics.roc_points(scores, labels, 1000)
    assert len(fpr) <= 1002 and (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert fpr == sorted(fpr) and tpr == sorted(tpr)
    area = float(np.trapezoid(tpr, fpr))
    assert area == pytest.approx(metrics.auroc(scores, labels), abs=1e-3)
    small = metrics.roc_points(scores[:50], labels[:50])
    full = metrics.roc_curve(scores[:50], labels[:50])
    assert small == (full[0].tolist(), full[1].tolist())
