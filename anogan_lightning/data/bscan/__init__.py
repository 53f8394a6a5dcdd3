"""The 2-D B-scan pipeline: how a B-scan file becomes model input.

- :mod:`~anogan_lightning.data.bscan.io`: the one list of image suffixes, folder listing
  (links followed), decoders, the threaded read-once of ``preload``.
- :mod:`~anogan_lightning.data.bscan.preprocessing`: :class:`BScanPreprocessing`, the one
  object that the data modules build, the checkpoint stores and prediction rebuilds; it builds
  the datasets.
- :mod:`~anogan_lightning.data.bscan.crop`: whole scans as one square image (``resize=crop``).
- :mod:`~anogan_lightning.data.bscan.retina_windows`: retina-normalised scans as windows
  (``resize=retina``).
- :mod:`~anogan_lightning.data.bscan.windows`: window positions and the window -> B-scan rules.

The data modules that list B-scans: :mod:`anogan_lightning.data.bscan_folder` (generic) and
:mod:`anogan_lightning.data.kermany` (a preset).
"""
