"""A small example module: `exlsp complete tests/data/example.py:14:5` completes inside it."""

from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float


def distance(a: Point, b: Point) -> float:
    """Euclidean distance between two points."""

    return ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5
