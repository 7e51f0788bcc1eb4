"""``qtool export`` (not implemented yet: tracked as issue 4)."""

from __future__ import annotations

from qtool.cli._pending import pending
from qtool.cli.options import Source


def export_cmd(src: Source) -> None:
    """[not implemented yet] Write or convert to GGUF or safetensors."""
    raise pending("export", "issue 4")
