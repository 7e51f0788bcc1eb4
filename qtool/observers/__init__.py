"""Observers: what the runner's hooks accumulate, and the file it is kept in.

- :mod:`.stats`: the accumulators fed by forward hooks on linear layers (input statistics, the
  importance matrix, histograms, output ranges, the one Hessian accumulator GPTQ solves on),
  their exact group folds and their fixed-order merge across ranks;
- :mod:`.statsfile`: the calibration stats file (:func:`~.statsfile.load_stats`,
  :class:`~.statsfile.CalibrationStats`) and the model identity it records.

They sit below the layer runner (:mod:`qtool.runner`) and the methods that read them
(:mod:`qtool.methods`), above the model families and the checkpoint reader; ``qtool calibrate``
(:mod:`qtool.calibrate`) is one user of them.
"""
