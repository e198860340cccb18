"""Tensor shapes as fastrun writes them: tuples of ints, and ``1x3x224x224`` in text."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

Shape = tuple[int, ...]


def as_shape(dims: Iterable) -> Shape:
    """A shape as a tuple of Python ints (from a list, an array, numpy integers...)."""
    return tuple(int(d) for d in dims)


def dims_text(shape: Iterable) -> str:
    """``(1, 3, 224, 224)`` -> ``"1x3x224x224"`` (the ``--shape`` syntax)."""
    return "x".join(str(d) for d in shape)


def shapes_text(shapes: Mapping[str, Sequence[int]], sep: str = ", ") -> str:
    """``{"x": (1, 3), "y": (2,)}`` -> ``"x:1x3, y:2"``, in the mapping's order."""
    return sep.join(f"{name}:{dims_text(shape)}" for name, shape in shapes.items())
