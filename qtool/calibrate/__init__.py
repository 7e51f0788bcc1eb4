"""Calibration: the data, the streaming statistics, and their files.

- :mod:`.datasets`: named, local and Hub calibration sets, deterministic samples;
- :mod:`.stats`: accumulators fed by hooks (input statistics, the one Hessian accumulator);
- :mod:`.statsfile`: the stats file (:func:`~.statsfile.load_stats`, :class:`~.statsfile.
  CalibrationStats`); :mod:`.imatrix`: llama.cpp's importance matrix, read and written;
- :mod:`.pipeline`: ``qtool calibrate`` (:func:`~.pipeline.prepare`, :func:`~.pipeline.calibrate`,
  :func:`~.pipeline.run_calibrate`); ``qtool.api.calibrate`` is the public entry point.

Nothing is imported here, so the light modules (``imatrix``, ``statsfile``) load without the
layer runner.
"""
