"""Calibration: activation statistics and importance matrices (``qtool calibrate``).

Public surface:

- :func:`load_stats` / :class:`CalibrationStats`: read a stats file, checked against a model
  (``quantize`` and ``export`` call it);
- :func:`prepare` + :func:`calibrate` with :class:`CalibrateOptions`: the pipeline the CLI runs;
- :func:`save_stats`, :func:`imatrix_of`, :func:`save_imatrix`, :func:`load_imatrix`: outputs.
"""

from __future__ import annotations

from qtool.calibrate.imatrix import Imatrix, ImatrixEntry, load_imatrix, save_imatrix
from qtool.calibrate.pipeline import CalibrateOptions, calibrate, imatrix_of, prepare
from qtool.calibrate.stats import LinearStats
from qtool.calibrate.statsfile import (
    CalibrationStats,
    StatsMismatchError,
    load_stats,
    save_stats,
)

__all__ = [
    "CalibrateOptions",
    "CalibrationStats",
    "Imatrix",
    "ImatrixEntry",
    "LinearStats",
    "StatsMismatchError",
    "calibrate",
    "imatrix_of",
    "load_imatrix",
    "load_stats",
    "prepare",
    "save_imatrix",
    "save_stats",
]
