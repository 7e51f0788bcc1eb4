"""An importance matrix for export, read the way llama-quantize reads it.

The files (GGUF ``NAME.in_sum2``/``NAME.counts`` or legacy ``.dat``) are parsed by
:mod:`qtool.calibrate.imatrix`, which also writes them; this module turns them into the
per-column weights the codecs take and refuses an imatrix made for another model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtool.errors import BadInputError


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """name (llama.cpp tensor name) -> float32 per-column importance, as llama-quantize
    derives it from the file (``ImatrixEntry.importance``)."""
    from qtool.calibrate.imatrix import load_imatrix

    return {n: e.importance.reshape(-1) for n, e in load_imatrix(path).entries.items()}


def check_imatrix(imatrix: dict[str, np.ndarray], columns: dict[str, int], path: Path) -> None:
    """Refuse an imatrix made for another model: names must be this model's and lengths match."""
    known = [n for n in imatrix if n in columns]
    if not known:
        raise BadInputError(
            f"{path}: none of its {len(imatrix)} entries name a tensor of this model",
            hint="was it computed for another model? re-run `qtool calibrate` on this one",
        )
    for n in known:
        if imatrix[n].size % columns[n]:
            raise BadInputError(
                f"{path}: entry {n} has {imatrix[n].size} values but the tensor has "
                f"{columns[n]} columns",
                hint="the imatrix belongs to another model",
            )
