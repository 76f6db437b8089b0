"""Behaviour of the trained model (no servers): what any sane duration model must do.

Every test runs on the fitted model and on the same model saved the way train.py logs it
(models from code: source file + skops state artifacts) and loaded back by MLflow.
"""

from __future__ import annotations

import pickle
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest

from serve.errors import InvalidInput, ModelNotReady
from serve.features import RIDE_COLUMNS, ride_dicts, validate_rides
from serve.model import RideDurationModel
from serve.tlc import read_training_frame
from train import build_estimator, fit_model, model_files, scores


@pytest.fixture(scope="module")
def frames(months):
    return read_training_frame(str(months.train)), read_training_frame(str(months.val))


@pytest.fixture(scope="module", params=["lr", "rf"])
def fitted(request, frames):
    train_df, _ = frames
    if request.param == "rf":
        train_df = train_df.sample(15_000, random_state=0)
    return fit_model(train_df, build_estimator(request.param, 20, 12, 5))


EXAMPLE = [{"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}]


def save_and_load(model: RideDurationModel, folder) -> mlflow.pyfunc.PyFuncModel:
    """``model`` saved as train.py logs it (no warning, no pickle) and loaded by MLflow."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlflow.pyfunc.save_model(folder / "model", **model_files(model, folder / "files",
                                                                    EXAMPLE))
    return mlflow.pyfunc.load_model(str(folder / "model"))


@pytest.fixture(scope="module")
def logged(fitted, tmp_path_factory):
    return save_and_load(fitted, tmp_path_factory.mktemp("model"))


@pytest.fixture(params=["fitted", "logged"])
def model(request, fitted, logged):
    return fitted if request.param == "fitted" else logged.unwrap_python_model()


def test_longer_trip_between_same_zones_is_not_shorter(model, frames):
    _, val_df = frames
    pairs = val_df[["PULocationID", "DOLocationID"]].drop_duplicates().head(300)
    short = pairs.assign(trip_distance=2.0)
    long_ = pairs.assign(trip_distance=6.0)
    assert model.predict_frame(long_).mean() > model.predict_frame(short).mean()


def test_unseen_zone_pair_still_predicts(model, frames):
    train_df, _ = frames
    seen = set(zip(train_df["PULocationID"], train_df["DOLocationID"], strict=True))
    pu, do = next((p, d) for p in range(1, 266) for d in range(1, 266) if (p, d) not in seen)
    pred = model.predict_frame(pd.DataFrame([{"PULocationID": pu, "DOLocationID": do,
                                              "trip_distance": 3.0}]))
    assert pred.shape == (1,) and np.isfinite(pred[0]) and 0 < pred[0] < 120


def test_beats_predicting_the_mean(model, frames):
    train_df, val_df = frames
    y = val_df["duration"].to_numpy()
    baseline = scores(y, np.full(len(y), train_df["duration"].mean()))["rmse"]
    assert scores(y, model.predict_frame(val_df))["rmse"] < 0.8 * baseline


def test_served_estimator_is_single_threaded(model):
    assert getattr(model.estimator, "n_jobs", 1) == 1


def test_predictions_equal_the_course_pipeline(model, frames):
    _, val_df = frames
    course = model.estimator.predict(model.vectorizer.transform(ride_dicts(val_df)))
    np.testing.assert_allclose(model.predict_frame(val_df), course, rtol=0, atol=1e-9)


def test_served_predictions_are_the_estimators_bit_for_bit(model, frames):
    _, val_df = frames
    for n in (1, 7, len(val_df)):  # the forest's own loop replaces its predict: same bits
        rides = validate_rides(val_df.head(n))
        expected = model.estimator.predict(model.transform(rides))
        np.testing.assert_array_equal(model.predict_rides(rides), expected)


def test_pyfunc_entry_accepts_frames_records_and_rejects_the_rest(model):
    ride = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}
    frame = model.predict(None, pd.DataFrame([ride]))
    assert model.predict(None, [ride]).tolist() == frame.tolist()
    assert model.predict(None, ride).tolist() == frame.tolist()
    with pytest.raises(InvalidInput, match="DataFrame of rides"):
        model.predict(None, "43,151,1.8")
    with pytest.raises(InvalidInput, match="trip_distance"):
        model.predict(None, pd.DataFrame([{**ride, "trip_distance": -2}]))


def test_pickle_round_trip_rebuilds_lookup_tables(model, frames):
    _, val_df = frames
    clone = pickle.loads(pickle.dumps(model))
    assert set(clone.__getstate__()) == {"vectorizer", "estimator"}
    np.testing.assert_array_equal(clone.predict_frame(val_df[list(RIDE_COLUMNS)]),
                                  model.predict_frame(val_df))


def test_logged_model_is_code_and_state_not_a_pickle(fitted, logged, frames):
    _, val_df = frames
    flavor = logged.metadata.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("model_code.py") and "python_model" not in flavor
    assert set(flavor["artifacts"]) == {"vectorizer", "estimator"}
    loaded = logged.unwrap_python_model()
    assert type(loaded) is RideDurationModel and loaded is not fitted
    np.testing.assert_array_equal(loaded.predict_frame(val_df), fitted.predict_frame(val_df))
    np.testing.assert_array_equal(logged.predict(val_df[list(RIDE_COLUMNS)]),
                                  fitted.predict_frame(val_df))


def test_load_context_without_state_is_not_ready():
    class Context:
        artifacts: dict = {}

    with pytest.raises(ModelNotReady, match="vectorizer"):
        RideDurationModel().load_context(Context())
