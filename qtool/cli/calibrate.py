"""``qtool calibrate`` (not implemented yet: tracked as issue 5)."""

from __future__ import annotations

from qtool.cli._pending import pending
from qtool.cli.options import Source


def calibrate_cmd(src: Source) -> None:
    """[not implemented yet] Collect activation statistics and an importance matrix."""
    raise pending("calibrate", "issue 5")
