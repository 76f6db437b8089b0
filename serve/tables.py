"""The fitted vectorizer as dense lookup tables, and for linear estimators the whole model.

``DictVectorizer`` maps the ``PU_DO`` string of a ride to a column; here that map is
a dense table over the (PU, DO) pair key, so a batch of rides becomes the model's
sparse matrix with a few numpy operations (no dicts, no strings). For a linear
estimator the prediction is a second table lookup (bit-identical to
``estimator.predict``), which is what makes one-ride requests cheap.

:class:`RideTables` is pure numpy: it is what :class:`serve.model.RideDurationModel`
predicts with, and, saved as an ``.npz`` (never a pickle) next to a cached model
version, what a serving process loads at start-up without importing MLflow,
scikit-learn or skops (``serve.modelcache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.features import KEY_BASE, Rides, pair_keys, validate_rides

PU_DO_PREFIX = "PU_DO="
# Bumped whenever the saved arrays change meaning; a file of another format is not used.
TABLES_FORMAT = 1


@dataclass(frozen=True)
class RideTables:
    """Feature columns of every (PU, DO) pair, plus the coefficients of a linear estimator."""

    pair_col: np.ndarray  # int64[KEY_BASE**2]: column of the pair, -1 if unseen in training
    distance_col: int
    n_features: int
    pair_coef: np.ndarray | None = None  # float64[KEY_BASE**2]: coefficient of the pair, or 0
    distance_coef: float = 0.0
    intercept: float = 0.0

    @classmethod
    def build(cls, vectorizer, estimator=None) -> RideTables:
        """Tables of a fitted ``DictVectorizer`` (and of ``estimator`` if it is linear)."""
        vocab = vectorizer.vocabulary_
        pair_col = np.full(KEY_BASE * KEY_BASE, -1, dtype=np.int64)
        for name, col in vocab.items():
            if name.startswith(PU_DO_PREFIX):
                pu, do = name[len(PU_DO_PREFIX):].split("_")
                pair_col[int(pu) * KEY_BASE + int(do)] = col
        distance_col = vocab["trip_distance"]
        coef = getattr(estimator, "coef_", None)
        if coef is None or np.ndim(coef) != 1 or not hasattr(estimator, "intercept_"):
            return cls(pair_col, distance_col, len(vocab))
        coef = np.asarray(coef, dtype=np.float64)
        return cls(pair_col, distance_col, len(vocab),
                   np.where(pair_col >= 0, coef[np.maximum(pair_col, 0)], 0.0),
                   float(coef[distance_col]), float(estimator.intercept_))

    @property
    def linear(self) -> bool:
        """Whether the tables hold the whole (linear) model, not only its features."""
        return self.pair_coef is not None

    def transform(self, rides: Rides):
        """The sparse matrix ``DictVectorizer.transform(ride_dicts)`` would build, without dicts."""
        import scipy.sparse as sp

        n = len(rides)
        cols = self.pair_col[pair_keys(rides)]
        known = cols >= 0
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(1 + known, out=indptr[1:])
        data = np.empty(indptr[-1], dtype=np.float64)
        indices = np.empty(indptr[-1], dtype=np.int64)
        first = indptr[:-1][known]
        data[first], indices[first] = 1.0, cols[known]
        last = indptr[1:] - 1
        data[last], indices[last] = rides.distance, self.distance_col
        return sp.csr_matrix((data, indices, indptr), shape=(n, self.n_features))

    def predict_rides(self, rides: Rides) -> np.ndarray:
        """Minutes for already-validated rides (linear tables only)."""
        if not self.linear:
            raise TypeError("these tables hold features only: predict with the estimator")
        if len(rides) == 0:
            return np.empty(0, dtype=np.float64)
        return (self.pair_coef[pair_keys(rides)] + rides.distance * self.distance_coef) + (
            self.intercept)

    def predict_frame(self, df) -> np.ndarray:
        """Validate a DataFrame of rides and predict minutes; raises InvalidInput."""
        return self.predict_rides(validate_rides(df))

    # -- an .npz file: plain arrays, loaded with allow_pickle=False
    def save(self, path: str | Path) -> None:
        """Write the tables to ``path`` (numpy's ``.npz``, no pickle)."""
        arrays = {"format": np.int64(TABLES_FORMAT), "key_base": np.int64(KEY_BASE),
                  "pair_col": self.pair_col, "distance_col": np.int64(self.distance_col),
                  "n_features": np.int64(self.n_features)}
        if self.linear:
            arrays.update(pair_coef=self.pair_coef, distance_coef=np.float64(self.distance_coef),
                          intercept=np.float64(self.intercept))
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RideTables | None:
        """Tables saved by :meth:`save`, or None if the file is of another format."""
        with np.load(path, allow_pickle=False) as f:
            if int(f["format"]) != TABLES_FORMAT or int(f["key_base"]) != KEY_BASE:
                return None
            linear = "pair_coef" in f.files
            return cls(f["pair_col"], int(f["distance_col"]), int(f["n_features"]),
                       f["pair_coef"] if linear else None,
                       float(f["distance_coef"]) if linear else 0.0,
                       float(f["intercept"]) if linear else 0.0)
