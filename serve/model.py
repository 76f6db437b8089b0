"""The pyfunc model every mode serves: raw rides in, minutes out, features inside.

``RideDurationModel`` wraps a fitted course-style ``DictVectorizer`` and an
estimator, but never builds dicts at prediction time: it predicts with
:class:`serve.tables.RideTables`, the vectorizer's vocabulary as a dense lookup
table over (PU, DO) pairs, and for linear estimators the prediction is computed
straight from that table (bit-identical to ``estimator.predict``), which is what
makes one-ride requests cheap.

It is logged as an MLflow *model from code*: ``serve/model_code.py`` (the file
MLflow runs at load time) builds an empty ``RideDurationModel`` and
``load_context`` fills it from the state logged as artifacts, the vectorizer and
the estimator in skops files. Versions logged before that (the instance itself
cloudpickled) still load: unpickling goes through ``__setstate__``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

try:  # mlflow is only needed to log or load; the pure logic runs without it.
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - exercised only in stripped environments
    PythonModel = object  # type: ignore[misc,assignment]

from serve.errors import InvalidInput, ModelNotReady
from serve.features import RIDE_COLUMNS, Rides, validate_rides
from serve.tables import RideTables

if TYPE_CHECKING:
    import scipy.sparse as sp

# The model's state, one artifact (a skops file) each.
STATE_ARTIFACTS = ("vectorizer", "estimator")
# skops trusts scikit-learn estimators, numpy and scipy types by default; a tree's node storage
# (RandomForest) is the one type our estimators add. The list lives here, never in the model.
TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]


class RideDurationModel(PythonModel):
    """Ride duration in minutes from raw rides (PULocationID, DOLocationID, trip_distance).

    Built fitted (``RideDurationModel(vectorizer, estimator)``) at training time, or empty by
    the models-from-code file and then filled by MLflow calling ``load_context``.
    """

    def __init__(self, vectorizer=None, estimator=None):
        self.vectorizer = vectorizer
        self.estimator = estimator
        if vectorizer is not None and estimator is not None:
            self._build_tables()

    # -- state: skops artifacts (models from code) or pickle (versions logged before)
    def save_state(self, folder: str | Path) -> dict[str, str]:
        """Write the vectorizer and the estimator as skops files in ``folder``; returns the
        ``artifacts`` mapping for ``mlflow.pyfunc.log_model``."""
        import zipfile

        import skops.io

        artifacts = {}
        for name in STATE_ARTIFACTS:
            path = Path(folder) / f"{name}.skops"
            # Deflated: a vocabulary of 3,700 pairs is 75 kB instead of 2.5 MB stored.
            skops.io.dump(getattr(self, name), path, compression=zipfile.ZIP_DEFLATED)
            artifacts[name] = str(path)
        return artifacts

    def load_context(self, context) -> None:
        """Load the state MLflow hands over as artifacts (a cloudpickled version has it already)."""
        artifacts = getattr(context, "artifacts", None) or {}
        if all(name in artifacts for name in STATE_ARTIFACTS):
            import skops.io

            self.vectorizer, self.estimator = (
                skops.io.load(artifacts[name], trusted=TRUSTED_TYPES) for name in STATE_ARTIFACTS)
            self._build_tables()
        elif self.vectorizer is None or self.estimator is None:
            raise ModelNotReady(f"the model's artifacts {list(STATE_ARTIFACTS)} are missing "
                                f"(got {sorted(artifacts)})")

    # pickling: the lookup tables are derived, rebuild them instead of storing them
    def __getstate__(self):
        return {"vectorizer": self.vectorizer, "estimator": self.estimator}

    def __setstate__(self, state):
        self.vectorizer = state["vectorizer"]
        self.estimator = state["estimator"]
        self._build_tables()

    def _build_tables(self) -> None:
        self.tables = RideTables.build(self.vectorizer, self.estimator)
        self._trees = _forest_trees(self.estimator)

    # -- features
    def transform(self, rides: Rides) -> sp.csr_matrix:
        """The sparse matrix ``DictVectorizer.transform(ride_dicts)`` would build, without dicts."""
        return self.tables.transform(rides)

    # -- prediction
    def predict_rides(self, rides: Rides) -> np.ndarray:
        """Minutes for already-validated rides."""
        if self.tables.linear:
            return self.tables.predict_rides(rides)
        if len(rides) == 0:
            return np.empty(0, dtype=np.float64)
        if self._trees is not None:
            return _forest_predict(self.estimator, self._trees, self.transform(rides))
        return np.asarray(self.estimator.predict(self.transform(rides)), dtype=np.float64)

    def predict_frame(self, df: pd.DataFrame) -> np.ndarray:
        """Validate a DataFrame of rides and predict minutes; raises InvalidInput."""
        return self.predict_rides(validate_rides(df))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """pyfunc entry point: a DataFrame (or records) of raw rides -> minutes.

        The hint is ``pd.DataFrame``, which MLflow accepts without inferring a schema from it:
        the logged signature stays the contract (and MLflow stops warning about missing hints).
        """
        if isinstance(model_input, dict):
            model_input = pd.DataFrame([model_input])
        elif isinstance(model_input, list):
            model_input = pd.DataFrame(model_input)
        elif not isinstance(model_input, pd.DataFrame):
            raise InvalidInput(
                f"expected a DataFrame of rides with columns {list(RIDE_COLUMNS)}, "
                f"got {type(model_input).__name__}"
            )
        return self.predict_frame(model_input)


def _forest_trees(estimator) -> list | None:
    """The trees of a fitted single-output forest regressor served one call at a time."""
    from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor

    if (isinstance(estimator, (RandomForestRegressor, ExtraTreesRegressor))
            and getattr(estimator, "n_outputs_", 0) == 1 and getattr(estimator, "n_jobs", 1)
            in (None, 1)):
        return list(estimator.estimators_)
    return None


def _forest_predict(forest, trees: list, X) -> np.ndarray:
    """``forest.predict(X)`` without joblib's dispatch around every tree: the same sum of the
    same tree predictions in the same order, so the same bits, ~4x faster for one ride (the
    dispatch, not the trees, is most of a small call's cost)."""
    X = forest._validate_X_predict(X)
    out = np.zeros(X.shape[0], dtype=np.float64)
    for tree in trees:
        out += tree.predict(X, check_input=False)
    out /= len(trees)
    return out
