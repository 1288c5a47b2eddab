"""A small example module: `exlsp complete tests/data/example.py:14:11` completes inside it."""

from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float


def distance(a: Point, b: Point) -> float:
    """Euclidean distance between two points."""
    return


def midpoint(a: Point, b: Point) -> Point:
    """The point halfway between a and b."""
    return Point((a.x + b.x) / 2, (a.y + b.y) / 2)
