"""What every guard module declares: :class:`Guard`, and the helpers they share."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Guard", "ms"]


@dataclass(frozen=True)
class Guard:
    """One guard: its plan letter, its fragment file and where its keys and arguments lie.

    ``name``: the fragment is ``celery_reliable/guards/<name>.lua``. ``admit`` and
    ``complete``: how many keys and arguments the guard takes in ``admit.lua`` and
    ``complete.lua`` (what its ``plan`` and ``release`` functions pass); the composed
    script steps past them to the next guard's.
    """

    letter: str
    name: str
    admit: tuple[int, int]
    complete: tuple[int, int] = (0, 0)


def ms(seconds: float) -> int:
    """``seconds`` as whole milliseconds for a script, at least 1."""
    return max(1, int(seconds * 1000))
