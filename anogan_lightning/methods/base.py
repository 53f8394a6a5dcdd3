"""AnomalyModule: the shared val/test logic. Methods implement ``training_step`` and ``score``."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from anogan_lightning import evaluation, pixel_eval, scoring
from anogan_lightning.losses import bce_discriminator_loss

N_SAMPLES = 8  # images per class kept for samples.png
N_EXTREMES = 4  # highest- and lowest-scoring test images kept for anomaly_maps/
MAP_NORM_BATCHES = 32  # training batches of normals the residual normaliser is fitted on


class DivergenceError(FloatingPointError):
    """A training loss became NaN or infinite."""


class AnomalyModule(pl.LightningModule):
    """Base of every method.

    Subclasses implement ``score(batch, batch_idx) -> dict`` returning at least ``score`` (B,), raw, higher =
    more anomalous; optionally more (B,) score components (each gets its own AUROC and a
    ``scores.csv`` column), ``x_hat`` (B, C, H, W) and ``amap`` (B, 1, H, W).

    At the end of validation the Youden cut-off of the val ROC is stored in the ``threshold``
    buffer (so it lives in the checkpoint); test reports metrics at that threshold too.
    ``records[split]`` keeps per-image ids, labels, class names (None where the data has no
    sub-classes), scores and a few sample images for the run's artefacts; ``results[split]`` the
    flat metrics, with bootstrap CIs of every AUROC and the per-class AUROCs.
    """

    #: methods whose scoring back-propagates at test time (latent search) set this
    needs_grad_at_test: bool = False
    #: image-level score components beside ``score``, in display order
    components: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        if self.reconstruct is not None:
            # (mean, std) of x_hat - x on training normals per x_hat intensity bin, for the
            # normalised anomaly maps (scoring.NORMALISED_MAPS); NaN until fitted
            self.register_buffer("map_norm", torch.full((2, scoring.NORM_BINS), math.nan))
        self.records: dict[str, dict] = {}
        self.results: dict[str, dict[str, float]] = {}
        self._buffers_by_split: dict[str, dict] = {}
        #: the data config the model was trained with (set by the entry point), so that
        #: ``anogan_lightning.predict`` preprocesses new scans the same way
        self.data_config: dict = {}
        #: the training run's provenance (``anogan_lightning.provenance``; set by the entry
        #: point), kept in the checkpoint so that predictions trace back to it
        self.provenance: dict = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["anogan_lightning"] = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "data": self.data_config,
            "provenance": self.provenance,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "map" in self.hparams and "map" not in checkpoint.get("hyper_parameters", {"map": 0}):
            # trained before the map choice: keep the map it was evaluated with
            self.hparams.map, self.hparams.map_sigma = self.legacy_map, 0.0
        stored = checkpoint.get("anogan_lightning", {})
        self.data_config = stored.get("data", {})
        self.provenance = stored.get("provenance", {})

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing = args[2]  # checkpoints from before the normaliser: it stays unfitted (NaN)
        if prefix + "map_norm" in missing:
            missing.remove(prefix + "map_norm")

    # -- training: per-epoch seeding, so a resumed run matches an uninterrupted one ------------
    def on_fit_start(self) -> None:
        self._run_seed = torch.initial_seed()  # seed_everything's value, before any reseeding

    def on_train_epoch_start(self) -> None:
        # noise drawn in training steps (z, random crops) comes from the global RNG, whose state
        # a checkpoint does not hold: reseed it from (run seed, epoch) at every epoch start
        seed = getattr(self, "_run_seed", torch.initial_seed()) * 100_003 + self.current_epoch
        pl.seed_everything(seed % 2**32, workers=True, verbose=False)

    # -- subclasses ---------------------------------------------------------------------------
    def score(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_complete(self) -> bool:
        """Whether the fit reached a state whose scores mean something (default: always).

        A method whose training can stop before it is usable (a time budget that ends a
        multi-stage fit before its last stage) returns False, and says why in
        :meth:`incomplete_reason`; the entry point then reports the run as incomplete, with no
        AUROC, instead of scoring it.
        """
        return True

    def incomplete_reason(self) -> str:
        """Why :meth:`training_complete` is False (one line, for results.json and the report)."""
        return f"{type(self).__name__}: training did not complete"

    #: reconstruction methods: x (B, C, H, W) -> x_hat, for the residual normaliser
    reconstruct = None
    #: methods with ``map=feature``: x -> (B, C, h, w), a layer of their own network
    map_features = None
    #: the map of checkpoints saved before the ``map`` hyperparameter existed
    legacy_map = "residual"

    # -- anomaly maps of reconstruction methods (hparams ``map``, ``map_sigma``) ----------------
    def anomaly_map(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """The ``map`` hyperparameter's map of x and x_hat (:func:`scoring.anomaly_map`)."""
        hp = self.hparams
        return scoring.anomaly_map(
            hp.get("map", "residual"),
            x.float(),
            x_hat.float(),
            self.map_norm,
            self.map_features,
            hp.get("map_sigma", 0.0),
        )

    @torch.no_grad()
    def fit_map_norm(self, loader, max_batches: int = MAP_NORM_BATCHES) -> None:
        """Fit ``map_norm`` on the reconstructions of (up to ``max_batches``) batches of normal
        images of ``loader``; eval mode, the training mode restored after."""
        was_training = self.training
        self.eval()
        moments = torch.zeros(3, scoring.NORM_BINS, dtype=torch.float64)
        for k, batch in enumerate(loader):
            if k >= max_batches:
                break
            if batch is None:
                continue
            x = batch["x"].to(self.device)
            moments += scoring.residual_moments(x, self.reconstruct(x)).cpu()
        if dist.is_available() and dist.is_initialized():
            moments = moments.to(self.device)
            dist.all_reduce(moments)
        self.map_norm.copy_(scoring.fit_residual_norm(moments.cpu()))
        self.train(was_training)

    def on_train_end(self) -> None:
        loader = getattr(self.trainer, "train_dataloader", None)
        if self.reconstruct is not None and loader is not None:
            self.fit_map_norm(loader)

    # -- helpers ------------------------------------------------------------------------------
    def check_finite(self, **losses: Tensor) -> None:
        """Stop training with one message naming the step and the loss term that diverged."""
        for name, value in losses.items():
            if not torch.isfinite(value).all():
                raise DivergenceError(
                    f"training diverged at global step {self.global_step} "
                    f"(epoch {self.current_epoch}): {name} = {value.item()}"
                )

    def adam(self, params) -> torch.optim.Adam:
        """Adam over ``params`` with the method's ``lr`` and ``betas`` hyperparameters."""
        return torch.optim.Adam(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def optimizer_update(self, opt, loss: Tensor, name: str | None = None) -> None:
        """One manual-optimisation update of ``opt`` on ``loss`` (zero grad, backward, step);
        with ``name``, a non-finite ``loss`` first stops training naming it (:meth:`check_finite`)."""
        if name is not None:
            self.check_finite(**{name: loss})
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()

    def bce_discriminator_update(
        self, discriminator: nn.Module, opt, x: Tensor, x_fake: Tensor, real_label: float = 1.0
    ) -> dict[str, Tensor]:
        """The D step of a BCE GAN: one update of ``discriminator`` on
        -log D(x) - log(1 - D(x_fake)) (:func:`~anogan_lightning.losses.bce_discriminator_loss`);
        ``x_fake`` is detached, so no gradient reaches the network that made it.

        Returns the logs ``train/loss_d``, ``train/d_real`` and ``train/d_fake`` (mean D output).
        """
        with self.toggled_optimizer(opt):
            logit_real = discriminator(x)
            logit_fake = discriminator(x_fake.detach())
            loss_d = bce_discriminator_loss(logit_real, logit_fake, real_label)
            self.optimizer_update(opt, loss_d, "train/loss_d")
        return {
            "train/loss_d": loss_d.detach(),
            "train/d_real": torch.sigmoid(logit_real).mean().detach(),
            "train/d_fake": torch.sigmoid(logit_fake).mean().detach(),
        }

    def _check_grad_mode(self) -> None:
        if self.needs_grad_at_test and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} back-propagates at test time (latent search): build the "
                "Trainer with inference_mode=False (its conf/method yaml sets "
                "trainer.inference_mode: false; do not override it)"
            )

    # -- evaluation loop ----------------------------------------------------------------------
    def _eval_dataset(self, split: str):
        """The dataset behind this split's loader (None outside a Trainer)."""
        if self._trainer is None:
            return None
        loaders = getattr(self.trainer, f"{'val' if split == 'val' else 'test'}_dataloaders", None)
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        return getattr(loaders, "dataset", None)

    def _start(self, split: str) -> None:
        self._check_grad_mode()
        ds = self._eval_dataset(split)
        # patches of larger images (OCT volumes with masks) or windows of whole B-scans (a
        # dataset with ``aggregate``): maps stitched back per B-scan
        windows = getattr(ds, "aggregate", None) is not None
        stitched = (getattr(ds, "has_mask", False) or windows) and hasattr(ds, "image_shapes")
        self._buffers_by_split[split] = {
            "dataset": ds,
            "stitcher": pixel_eval.Stitcher(ds.image_shapes) if stitched else None,
            "windows": windows,
            "image_index": [],  # windows: B-scan index of each window (coords[:, 0])
            "pixel_maps": [],  # whole images with masks: (B, H, W) maps and masks
            "pixel_masks": [],
            "ids": [],
            "labels": [],
            "classes": [],  # class names per image where the batches carry them ("cls")
            "score": [],
            "components": defaultdict(list),
            "samples": {0: [], 1: []},
            "highest": [],
            "lowest": [],
        }

    @staticmethod
    def _sample(batch: dict, out: dict[str, Tensor], i: int) -> dict:
        """One image's tensors (CPU, float32) for the figures."""
        label = int(batch["label"][i])
        sample = {
            "x": batch["x"][i].detach().float().cpu(),
            "label": label,
            "id": str(batch["id"][i]),
            "score": float(out["score"][i]),
            "title": ("normal", "anomalous")[label],
        }
        for key in ("x_hat", "amap"):
            if key in out:
                sample[key] = out[key][i].detach().float().cpu()
        if "mask" in batch:
            sample["mask"] = batch["mask"][i].detach().float().cpu()
        return sample

    def _collect(self, split: str, batch: dict, out: dict[str, Tensor]) -> None:
        buf = self._buffers_by_split[split]
        labels = batch["label"].detach().cpu()
        score = out["score"].detach().float().cpu()
        buf["ids"].extend(batch["id"])
        if "cls" in batch:
            buf["classes"].extend(str(c) for c in batch["cls"])
        buf["labels"].append(labels)
        buf["score"].append(score)
        for name in self.components:
            buf["components"][name].append(out[name].detach().float().cpu())
        for cls in (0, 1):  # the first few images per class for samples.png
            need = N_SAMPLES - len(buf["samples"][cls])
            for i in torch.nonzero(labels == cls).flatten()[:need].tolist():
                buf["samples"][cls].append(self._sample(batch, out, i))
        if buf["windows"]:
            buf["image_index"].append(batch["coords"][:, 0].detach().cpu())
        if "amap" in out and ("mask" in batch or buf["stitcher"] is not None):
            amap = out["amap"].detach().float().cpu()
            if buf["stitcher"] is not None and "coords" in batch:
                buf["stitcher"].add(amap, batch["coords"].cpu())
            elif "mask" in batch:  # whole images with masks: pixel-level evaluation
                buf["pixel_maps"].append(amap[:, 0].half())
                buf["pixel_masks"].append(batch["mask"][:, 0].detach().cpu() > 0.5)
        # running top-k / bottom-k by score, for the anomaly-map figures
        k = min(N_EXTREMES, len(score))
        for key, descending in (("highest", True), ("lowest", False)):
            idx = torch.sort(score, descending=descending, stable=True).indices[:k]
            merged = buf[key] + [self._sample(batch, out, i) for i in idx.tolist()]
            merged.sort(key=lambda s: s["score"], reverse=descending)
            buf[key] = merged[:N_EXTREMES]

    @staticmethod
    def _stitched(buf: dict) -> np.ndarray | None:
        """The split's stitched maps (N, H, W), restricted to the dataset's ``map_region``
        (retina B-scans: 0 outside ILM..BM by default), or None without a stitcher."""
        if buf["stitcher"] is None:
            return None
        maps = buf["stitcher"].maps()
        restrict = getattr(buf["dataset"], "restrict_maps", None)
        return restrict(maps) if restrict is not None else maps

    @staticmethod
    def _pixel_record(buf: dict, maps: np.ndarray | None) -> dict | None:
        """Pixel maps and masks of a split, (N, H, W) numpy, when the data has masks; ``maps``:
        the stitched ones (:meth:`_stitched`) where the split has a stitcher."""
        ds = buf["dataset"]
        if maps is not None:
            masks = [ds.image_mask(i) for i in range(len(ds.image_ids))]
            return {
                "maps": maps,
                "masks": pixel_eval.pad_stack(masks, maps.shape),
                "image": ds.image,
                "ids": ds.image_ids,
            }
        if buf["pixel_maps"]:
            return {
                "maps": torch.cat(buf["pixel_maps"]).float().numpy(),
                "masks": torch.cat(buf["pixel_masks"]).numpy().astype("uint8"),
            }
        return None

    @staticmethod
    def _gather(buf: dict) -> dict:
        """Merge every rank's buffers (DDP): metrics are computed over the whole split.

        A DistributedSampler pads the last ranks with repeated images; repeats are dropped by id.
        Stitched pixel maps are summed across ranks (a repeated patch adds the same map twice to
        its own pixels, which leaves their mean unchanged).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return buf
        mine = {
            "ids": buf["ids"],
            "classes": buf["classes"],
            "labels": torch.cat(buf["labels"])
            if buf["labels"]
            else torch.zeros(0, dtype=torch.long),
            "score": torch.cat(buf["score"]) if buf["score"] else torch.zeros(0),
            "components": {k: torch.cat(v) for k, v in buf["components"].items()},
            "samples": buf["samples"],
            "highest": buf["highest"],
            "lowest": buf["lowest"],
            "pixel_maps": buf["pixel_maps"],
            "pixel_masks": buf["pixel_masks"],
            "image_index": torch.cat(buf["image_index"]) if buf["image_index"] else None,
        }
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        seen: set[str] = set()
        keep = []  # (rank, index) of first occurrences
        for r, part in enumerate(parts):
            for i, id_ in enumerate(part["ids"]):
                if id_ not in seen:
                    seen.add(id_)
                    keep.append((r, i))
        out = dict(buf)
        out["ids"] = [parts[r]["ids"][i] for r, i in keep]
        if all(len(p["classes"]) == len(p["ids"]) for p in parts):
            out["classes"] = [parts[r]["classes"][i] for r, i in keep]
        else:
            out["classes"] = []
        out["labels"] = [torch.stack([parts[r]["labels"][i] for r, i in keep])] if keep else []
        out["score"] = [torch.stack([parts[r]["score"][i] for r, i in keep])] if keep else []
        names = parts[0]["components"].keys()
        out["components"] = {
            n: [torch.stack([parts[r]["components"][n][i] for r, i in keep])] for n in names if keep
        }
        out["samples"] = {
            c: [s for p in parts for s in p["samples"][c]][:N_SAMPLES] for c in (0, 1)
        }
        for key, desc in (("highest", True), ("lowest", False)):
            merged = {s["id"]: s for p in parts for s in p[key]}.values()
            out[key] = sorted(merged, key=lambda s: s["score"], reverse=desc)[:N_EXTREMES]
        if buf["windows"] and keep:
            out["image_index"] = [torch.stack([parts[r]["image_index"][i] for r, i in keep])]
        out["pixel_maps"] = [m for p in parts for m in p["pixel_maps"]]
        out["pixel_masks"] = [m for p in parts for m in p["pixel_masks"]]
        if buf["stitcher"] is not None:
            for name in ("sum", "count"):
                arr = getattr(buf["stitcher"], name)
                t = torch.from_numpy(arr.astype("float64"))
                dist.all_reduce(t)
                setattr(buf["stitcher"], name, t.numpy().astype(arr.dtype))
        return out

    def _finish(self, split: str) -> dict[str, float]:
        buf = self._gather(self._buffers_by_split.pop(split))
        if not buf["labels"]:
            return {}
        labels = torch.cat(buf["labels"])
        scores = torch.cat(buf["score"])
        components = {k: torch.cat(v) for k, v in buf["components"].items()}
        ids = buf["ids"]
        classes = buf["classes"] if len(buf["classes"]) == len(labels) else None
        maps = self._stitched(buf)
        if buf["windows"]:  # window scores -> one score per B-scan, labelled per B-scan
            ds = buf["dataset"]
            index = torch.cat(buf["image_index"])
            n = len(ds.image_ids)
            agg = pixel_eval.aggregate_windows
            # map_retina scores the B-scan from its stitched map; window scores (the
            # components, the window rules' AUROCs) are still aggregated, by max
            rule = "max" if ds.aggregate == "map_retina" else ds.aggregate
            scores, alternatives = agg(scores, index, n, rule, ds.top_k, all_rules=True)
            components = {k: agg(v, index, n, rule, ds.top_k)[0] for k, v in components.items()}
            components.update(alternatives)  # every rule's B-scan AUROC: auroc_window_<rule>
            by_map = None
            if maps is not None and hasattr(ds, "image_retina"):
                retina = [ds.image_retina(i) for i in range(n)]
                by_map = pixel_eval.retina_map_scores(maps, retina)
                if not torch.isfinite(by_map).any():  # the method gave no map
                    by_map = None
            if hasattr(ds, "thickness_scores"):  # the anatomy reference: auroc_thickness
                components["thickness"] = ds.thickness_scores()
            if by_map is not None:  # the mean map over the retina: auroc_map_retina
                components["map_retina"] = by_map
            if ds.aggregate == "map_retina":
                if by_map is None:
                    raise ValueError(
                        f"aggregate=map_retina needs an anomaly map; {type(self).__name__} "
                        "gave none for these windows (choose max, mean or topk)"
                    )
                scores = by_map
            seen = torch.zeros(n, dtype=torch.bool)
            seen[index] = True  # B-scans with at least one window scored
            labels = torch.as_tensor(ds.image_labels)[seen]
            scores = scores[seen]
            components = {k: v[seen] for k, v in components.items()}
            ids = [id_ for id_, s in zip(ds.image_ids, seen.tolist(), strict=True) if s]
            if classes is not None:  # each window carries its B-scan's class
                per_image: list[str | None] = [None] * n
                for i, c in zip(index.tolist(), classes, strict=True):
                    per_image[i] = c
                classes = [c for c, s in zip(per_image, seen.tolist(), strict=True) if s]
        val_threshold = float(self.threshold) if split == "test" else None
        metrics = evaluation.evaluate(scores, labels, split, components, val_threshold, classes)
        pixel = self._pixel_record(buf, maps)
        if pixel is not None and pixel["masks"].any():
            metrics.update(pixel_eval.pixel_metrics(pixel["maps"], pixel["masks"], split))
        if split == "val" and evaluation.has_both_classes(labels):
            self.threshold.fill_(metrics["val/youden_threshold"])
        self.records[split] = {
            "ids": ids,
            "labels": labels,
            "classes": classes,
            "score": scores,
            "components": components,
            "samples": buf["samples"][0] + buf["samples"][1],
            "highest": buf["highest"],
            "lowest": buf["lowest"],
            "pixel": pixel if pixel is not None and "image" in pixel else None,
        }
        self.results[split] = metrics
        if metrics and self._trainer is not None:
            self.log_dict({k: float(v) for k, v in metrics.items()}, sync_dist=False)
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch is not None:
            self._collect("val", batch, self.score(batch, batch_idx))

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if batch is not None:
            self._collect("test", batch, self.score(batch, batch_idx))

    def on_test_epoch_end(self) -> None:
        self._finish("test")
