"""How much two vector spaces agree about who is near whom: the ``--check-sample`` report.

Vectors of two models cannot be compared with each other, but the neighbourhoods they
induce can: for each sample item, its top-k nearest neighbours by cosine (among the
sample) in the old space and in the new one, and the share of those neighbours both
spaces name.

Example::

    agreement = neighbour_agreement(old_vectors, new_vectors, k=10)
    agreement.mean   # 0.8: on average 8 of the 10 nearest neighbours stay the same
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_K = 10


@dataclass(frozen=True)
class Agreement:
    """Nearest-neighbour agreement over a sample.

    Attributes:
        sample: items compared.
        k: neighbours per item (fewer than asked when the sample is small).
        mean: mean over items of |old top-k ∩ new top-k| / k, from 0 to 1.
        min: the lowest item's share.
    """

    sample: int
    k: int
    mean: float
    min: float

    def to_json(self) -> dict[str, float | int]:
        return {"sample": self.sample, "k": self.k, "mean_agreement": self.mean, "min_agreement": self.min}


def neighbour_agreement(old: np.ndarray, new: np.ndarray, k: int = DEFAULT_K) -> Agreement:
    """Compare the top-``k`` cosine neighbourhoods of the same items in two spaces.

    Args:
        old: one row per item, the old space's vectors (any width).
        new: the same items in the same order, the new space's vectors (any width).
        k: neighbours per item; capped at ``len(old) - 1``.

    Raises:
        ValueError: the two hold different numbers of items, or fewer than two.
    """
    if len(old) != len(new):
        raise ValueError(f"{len(old)} old vectors but {len(new)} new ones: give the same items")
    if len(old) < 2:
        raise ValueError("at least two items are needed to compare neighbours")
    k = min(k, len(old) - 1)
    old_top, new_top = _top_k(old, k), _top_k(new, k)
    shares = np.array([len(set(a) & set(b)) / k for a, b in zip(old_top, new_top, strict=True)])
    return Agreement(
        sample=len(old), k=k, mean=round(float(shares.mean()), 4), min=round(float(shares.min()), 4)
    )


def _top_k(vectors: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's ``k`` most cosine-similar other rows."""
    unit = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit = unit / np.where(norms == 0, 1.0, norms)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)  # an item is not its own neighbour
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]
