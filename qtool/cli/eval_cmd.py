"""``qtool eval`` (not implemented yet: tracked as issue 7)."""

from __future__ import annotations

from qtool.cli._pending import pending
from qtool.cli.options import Source


def eval_command(src: Source) -> None:
    """[not implemented yet] Perplexity, KL divergence and top-1 agreement vs the base model."""
    raise pending("eval", "issue 7")
