"""Commands whose implementation has not landed: they say so and exit 1, never pretend."""

from __future__ import annotations

from qtool.errors import NotImplementedYetError


def pending(command: str, issue: str) -> NotImplementedYetError:
    return NotImplementedYetError(
        f"`qtool {command}` is not implemented yet ({issue})",
        hint="`qtool inspect` works today; see the README's status table",
    )
