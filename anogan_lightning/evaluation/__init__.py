"""Evaluation: how a method's scores become the numbers and figures of a run.

- :mod:`.metrics`: image-level AUROC, AP, ROC, Youden cut-off, metrics at a threshold, bootstrap
  confidence intervals, per-class AUROC, paired differences between runs;
- :mod:`.pixel`: pixel-level metrics where lesion masks exist (pixel AUROC, best Dice, AUPRO);
- :mod:`.stitch`: patch and window maps back into their B-scans, window scores into B-scan
  scores (:func:`~.stitch.window_to_bscan`, shared with ``predict``);
- :mod:`.protocol`: what the evaluation reads from a val/test dataset;
- :mod:`.collector`: the evaluation of one split, driven by the methods' val/test hooks (buffers,
  DDP gather, stitching, aggregation, reference scores, metrics, threshold, status);
- :mod:`.figures`: every figure of the package (the only module that imports matplotlib).

Nothing is imported here: ``from anogan_lightning.evaluation import metrics`` loads no plotting.
"""
