"""What generated evaluations are made of, with skewed (Zipf-like) weights as real data has."""

from __future__ import annotations

import bisect
import itertools
import random
from typing import TypeVar

T = TypeVar("T")


class Weighted(list[T]):
    """Values with cumulative weights, for a fast weighted pick."""

    def __init__(self, values: list[T], weights: list[float]) -> None:
        super().__init__(values)
        self.cumulative = list(itertools.accumulate(weights))


def zipf(values: list[T], exponent: float = 1.0) -> Weighted[T]:
    return Weighted(values, [1 / (rank + 1) ** exponent for rank in range(len(values))])


def pick(rng: random.Random, values: Weighted[T]) -> T:
    return values[bisect.bisect(values.cumulative, rng.random() * values.cumulative[-1])]


TASK_TYPES: Weighted[str | None] = Weighted(
    ["headshot", "product", "banner", "avatar", "logo", "interior", None],
    [35, 25, 12, 10, 8, 6, 4],
)
FAILURES = Weighted(
    ["invalid_media", "processing_failed", "dispatch_failed", "timed_out"], [40, 30, 15, 15]
)
_SUBJECTS = [
    "Left hand", "Right hand", "Fingers", "Eyes", "Teeth", "Ear", "Hairline", "Collar",
    "Sleeve", "Logo", "Label text", "Background", "Shadow", "Reflection", "Horizon",
    "Product edge", "Packaging", "Skin tone", "Jawline", "Glasses", "Necklace", "Watch",
    "Button", "Tie", "Furniture", "Window", "Lamp", "Floor", "Ceiling", "Plant",
]  # fmt: skip
_DEFECTS = [
    "is distorted", "is blurred", "has artifacts", "is missing", "is duplicated",
    "has wrong colour", "is cropped", "is asymmetric",
]  # fmt: skip
LABELS = zipf([f"{s} {d}" for s, d in itertools.product(_SUBJECTS, _DEFECTS)], 0.9)
CATEGORIES = zipf(
    [
        (category, sub)
        for category, subs in {
            "anatomy": ["hands", "face", "limbs", "eyes"],
            "garment": ["collar", "fit", "texture", "logo"],
            "prompt": ["missing_object", "wrong_color", "style"],
            "composition": ["cropping", "framing", "horizon"],
            "lighting": ["exposure", "shadows", "color_cast"],
            "text": ["garbled", "spelling"],
            "identity": ["likeness", "age"],
            "product": ["shape", "label", "proportions"],
        }.items()
        for sub in subs
    ],
    0.7,
)
