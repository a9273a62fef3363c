"""What every format's check shares: the BadImage error and the pixel-limit callback type."""

from __future__ import annotations

from collections.abc import Callable


class BadImage(ValueError):
    """The bytes are not a whole, well-formed image. The message is short and safe to show a client."""


# Called with a width and height as soon as a header gives them; raises BadImage over the limit.
Limit = Callable[[int, int], None]
