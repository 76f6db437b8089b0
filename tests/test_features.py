"""Unit tests of ride validation and feature building (pure logic, no servers)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LinearRegression

from serve.errors import InvalidInput
from serve.features import (
    RIDE_COLUMNS,
    check_rides,
    duration_mask,
    parse_ride,
    ride_dicts,
    ride_durations,
    rides_from_rows,
    validate_rides,
)
from serve.model import RideDurationModel

GOOD = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}

# (field that is wrong, value) -> every mode must name that field.
BAD_VALUES = [
    ("PULocationID", 0),
    ("PULocationID", 266),
    ("PULocationID", -5),
    ("PULocationID", 1.5),
    ("PULocationID", "43"),
    ("PULocationID", True),
    ("PULocationID", None),
    ("PULocationID", float("nan")),
    ("DOLocationID", 1000),
    ("DOLocationID", "abc"),
    ("DOLocationID", [1]),
    ("trip_distance", -0.1),
    ("trip_distance", float("inf")),
    ("trip_distance", float("nan")),
    ("trip_distance", "1.8"),
    ("trip_distance", None),
    ("trip_distance", False),
    ("trip_distance", 10**400),  # beyond float range: must not raise OverflowError
    ("PULocationID", 10**400),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_parse_ride_names_the_bad_field(field, value):
    with pytest.raises(InvalidInput) as err:
        parse_ride({**GOOD, field: value})
    assert err.value.field == field
    assert field in err.value.message


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_dataframe_validation_agrees_with_record_parsing(field, value):
    df = pd.DataFrame([GOOD, {**GOOD, field: value}, GOOD])
    _, reasons = check_rides(df)
    assert list(reasons == "") == [True, False, True]
    assert reasons[1].startswith(field)
    with pytest.raises(InvalidInput) as err:
        validate_rides(df)
    assert err.value.field == field
    assert "row 1" in err.value.message


@pytest.mark.parametrize("missing", RIDE_COLUMNS)
def test_missing_field_is_named(missing):
    ride = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(InvalidInput, match=f"missing field: '{missing}'"):
        parse_ride(ride)
    with pytest.raises(InvalidInput, match=f"missing field: '{missing}'"):
        validate_rides(pd.DataFrame([ride]))


def test_good_values_accepted_in_every_form():
    # integral floats (a column with nulls elsewhere) and ints for distance are fine; extra keys
    # are ignored.
    rides = [GOOD, {"PULocationID": 1.0, "DOLocationID": 265, "trip_distance": 0, "x": "y"}]
    parsed = rides_from_rows([parse_ride(r) for r in rides])
    assert parsed.pu.tolist() == [43, 1] and parsed.do.tolist() == [151, 265]
    assert parsed.distance.tolist() == [1.8, 0.0]
    framed = validate_rides(pd.DataFrame(rides))
    assert framed.pu.tolist() == [43, 1] and framed.distance.tolist() == [1.8, 0.0]


@pytest.mark.parametrize("n", [0, 1, 3])
def test_rides_from_rows_builds_typed_columns_for_any_count(n):
    rides = rides_from_rows([(43, 151, 1.8)] * n)
    assert len(rides) == n
    assert (rides.pu.dtype, rides.do.dtype, rides.distance.dtype) == (np.int64, np.int64,
                                                                      np.float64)


def test_a_ride_must_be_an_object():
    with pytest.raises(InvalidInput, match="JSON object"):
        parse_ride("not a ride")


def test_duration_filter_keeps_one_to_sixty_minutes():
    pickup = pd.Series(pd.to_datetime(["2021-01-01 10:00"] * 5))
    dropoff = pickup + pd.to_timedelta([30, 59, 600, 3600, -60], unit="s")
    minutes = ride_durations(pickup, dropoff)
    assert minutes.tolist() == [0.5, 59 / 60, 10.0, 60.0, -1.0]
    assert duration_mask(minutes).tolist() == [False, False, True, True, False]
    assert not duration_mask(np.array([math.nan])).any()


def _fitted(n: int = 2000, seed: int = 0) -> tuple[RideDurationModel, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"PULocationID": rng.integers(1, 20, n),
                       "DOLocationID": rng.integers(1, 20, n),
                       "trip_distance": rng.exponential(3, n).round(2)})
    dv = DictVectorizer()
    X = dv.fit_transform(ride_dicts(df))
    y = 2 + 3 * df["trip_distance"].to_numpy() + rng.normal(0, 1, n)
    return RideDurationModel(dv, LinearRegression().fit(X, y)), df


def test_vectorized_transform_equals_dictvectorizer():
    model, df = _fitted()
    unseen = pd.DataFrame([{"PULocationID": 200, "DOLocationID": 201, "trip_distance": 2.0}])
    frame = pd.concat([df, unseen], ignore_index=True)
    ours = model.transform(validate_rides(frame))
    course = model.vectorizer.transform(ride_dicts(frame))
    assert ours.shape == course.shape
    assert (ours != course).nnz == 0


def test_fast_linear_path_matches_sklearn_predict():
    model, df = _fitted()
    course = model.estimator.predict(model.vectorizer.transform(ride_dicts(df)))
    np.testing.assert_allclose(model.predict_frame(df), course, rtol=0, atol=1e-9)
