"""Calibration: the data, ``qtool calibrate``, and llama.cpp's importance matrix.

- :mod:`.datasets`: named, local and Hub calibration sets, deterministic samples;
- :mod:`.imatrix`: llama.cpp's importance matrix, read and written;
- :mod:`.pipeline`: ``qtool calibrate`` (:func:`~.pipeline.prepare`, :func:`~.pipeline.calibrate`,
  :func:`~.pipeline.run_calibrate`); ``qtool.api.calibrate`` is the public entry point.

The accumulators the hooks feed and the stats file live below the runner, in
:mod:`qtool.observers`. Nothing is imported here, so ``imatrix`` loads without the layer runner.
"""
