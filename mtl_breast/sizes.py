"""Three-axis sizes (an image, a training crop, a patch, an inference window), given as one int or three.

Both the models (image and patch sizes) and the data pipeline (crop sizes) read sizes this way, so the reading
lives here, below both: it imports nothing from the package and no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["positive_int_triple", "to_3tuple"]


def to_3tuple(value: int | Sequence[int], *, name: str = "value") -> tuple[int, int, int]:
    """Turn an int or a length-3 sequence (a JSON list included) into a tuple of three positive ints."""
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value}")
    return value  # type: ignore[return-value]


def positive_int_triple(value: Any) -> tuple[int, int, int] | None:
    """``value`` as three positive ints when it is one int or a sequence of three, else None.

    The strict reading of a size from a file or a command line: bools, floats and strings are not ints here, where
    `to_3tuple` converts whatever it is given.
    """
    sizes = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(sizes, (list, tuple)) or len(sizes) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)):
        return None
    return tuple(sizes)  # type: ignore[return-value]
