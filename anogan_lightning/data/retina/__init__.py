"""The retina in an OCT B-scan, as pure numpy functions (AnoGAN, Schlegl et al. 2017, sec. 3).

- :mod:`~anogan_lightning.data.retina.segment`: ILM and Bruch's membrane (minimum-cost paths),
  the per-scan failure checks, registration fill.
- :mod:`~anogan_lightning.data.retina.normalize`: intensities, column resampling, flattening on
  BM, and the retina normalisation of one B-scan (:class:`RetinaNorm`, ``normalize_bscan``).
- :mod:`~anogan_lightning.data.retina.patches`: patch positions on a flattened band, patches,
  patch labels.

Used by the B-scan pipeline (:mod:`anogan_lightning.data.bscan`) and the volume pipeline
(:mod:`anogan_lightning.data.volume_cache`, :mod:`anogan_lightning.data.patch_cache`).
"""
