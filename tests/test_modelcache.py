"""The version cache (serve/modelcache.py) and model loading (serve/registry.py) against the
session's real tracking server: an alias is always resolved against the registry, only
immutable versions are cached, a partial or corrupt entry is never used, concurrent fills
agree, the cache stays within its bound, no load leaks a temporary folder (issue 14 item 11)
and a version whose artifacts are gone fails with a message that says what to do (item 12).

Own registered model name (``duration-cache``), so the session's ``duration`` is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from serve import modelcache
from serve.errors import ModelNotReady
from serve.features import validate_rides
from serve.registry import load_model, load_ref, resolve_model
from serve.tables import RideTables
from serve.tlc import read_training_frame
from serve.web.holder import ModelHolder
from serve.web.metrics import Metrics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
NAME = "duration-cache"
ALIAS = f"models:/{NAME}@production"


@pytest.fixture(scope="module")
def versions(tracking_server, months) -> dict[str, str]:
    """Three versions of ``duration-cache``, trained on different samples (other weights);
    version 3 is the one tests may break. The alias starts on version 1."""
    from train import run_training

    made = [run_training(str(months.train), str(months.val), registered_model=NAME,
                         train_rows=rows, seed=seed)["version"]
            for rows, seed in ((20_000, 0), (5_000, 1), (3_000, 2))]
    assert made == ["1", "2", "3"]
    MlflowClient().set_registered_model_alias(NAME, "production", "1")
    return {"uri": ALIAS}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache of this test's own."""
    path = tmp_path / "model-cache"
    monkeypatch.setenv("MODEL_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def rides(months):
    return validate_rides(read_training_frame(str(months.test)).head(5_000))


def reference(version: str, rides) -> np.ndarray:
    """What MLflow's own pyfunc of ``version`` predicts (downloaded outside our cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}", dst_path=tmp)
        return pyfunc.unwrap_python_model().predict_rides(rides)


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def set_alias(version: str) -> None:
    MlflowClient().set_registered_model_alias(NAME, "production", version)


def test_alias_moves_and_the_new_version_is_loaded(versions, cache, rides):
    set_alias("1")
    first = load_model(ALIAS)  # downloaded, loaded by MLflow, cached
    assert first.version == "1" and first.pyfunc_loaded
    again = load_model(ALIAS)  # from the cache: the tables, no pyfunc until asked
    assert again.version == "1" and not again.pyfunc_loaded
    assert isinstance(again.python_model, RideTables)
    v1 = reference("1", rides)
    np.testing.assert_array_equal(again.python_model.predict_rides(rides), v1)

    set_alias("2")  # the cache holds version 1 only: the registry decides, never the cache
    moved = load_model(ALIAS)
    assert moved.version == "2"
    v2 = reference("2", rides)
    assert not np.allclose(v1, v2)  # other weights: a stale version would show
    np.testing.assert_array_equal(moved.python_model.predict_rides(rides), v2)
    np.testing.assert_array_equal(load_model(ALIAS).python_model.predict_rides(rides), v2)
    assert len(entries(cache)) == 2
    set_alias("1")


def test_an_unreachable_registry_is_an_error_not_the_cached_alias(versions, cache, monkeypatch):
    load_model(ALIAS)  # cached
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    try:
        with pytest.raises(ModelNotReady, match="cannot resolve 'models:/duration-cache@prod"):
            load_model(ALIAS)
    finally:
        mlflow.set_tracking_uri(saved)


def test_rest_and_mlflow_client_resolve_alike(versions):
    client = MlflowClient()
    for uri in (ALIAS, f"models:/{NAME}/2", f"models:/{NAME}/latest", f"models:/{NAME}/Production"):
        assert resolve_model(uri) == resolve_model(uri, client), uri
    for uri in (f"models:/{NAME}@nope", f"models:/{NAME}/99", "models:/no-such-model@production"):
        with pytest.raises(ModelNotReady, match=f"cannot resolve '{uri}'"):
            resolve_model(uri)


def test_cached_tables_predict_exactly_as_the_pyfunc(versions, cache, rides):
    ref = resolve_model(ALIAS)
    full = load_ref(ref)
    fast = load_ref(ref)
    assert isinstance(fast.python_model, RideTables)
    np.testing.assert_array_equal(fast.python_model.predict_rides(rides),
                                  full.pyfunc.predict(rides_frame(rides)))
    # The pyfunc of a fast load comes on demand, from the same entry.
    assert fast.input_schema.input_names() == ["PULocationID", "DOLocationID", "trip_distance"]
    assert fast.pyfunc_loaded


def rides_frame(rides):
    import pandas as pd

    return pd.DataFrame({"PULocationID": rides.pu, "DOLocationID": rides.do,
                         "trip_distance": rides.distance})


def _poisoned_tables(path: Path) -> None:
    """Valid tables that predict 100 minutes more: only the manifest can tell."""
    t = RideTables.load(path)
    RideTables(t.pair_col, t.distance_col, t.n_features, t.pair_coef, t.distance_coef,
               t.intercept + 100.0).save(path)


CORRUPTIONS = {
    "tables replaced by valid ones with other weights": lambda e: _poisoned_tables(
        e / modelcache.TABLES),
    "tables truncated": lambda e: (e / modelcache.TABLES).write_bytes(
        (e / modelcache.TABLES).read_bytes()[:100]),
    "one byte flipped in the estimator": lambda e: _flip(e / "artifacts" / "estimator.skops"),
    "a file missing": lambda e: (e / "MLmodel").unlink(),
    "manifest missing": lambda e: (e / modelcache.MANIFEST).unlink(),
    "manifest garbage": lambda e: (e / modelcache.MANIFEST).write_text("{not json"),
    "manifest of another version": lambda e: _rekey(e / modelcache.MANIFEST),
    "manifest with a malformed file entry": lambda e: _malform(e / modelcache.MANIFEST),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _malform(manifest: Path) -> None:
    m = json.loads(manifest.read_text())
    m["files"]["MLmodel"] = "not [size, sha256]"
    manifest.write_text(json.dumps(m))


def _rekey(manifest: Path) -> None:
    m = json.loads(manifest.read_text())
    m["key"]["version"] = "2"
    manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_or_partial_entry_is_never_used(versions, cache, rides, corruption, caplog):
    set_alias("1")
    load_model(ALIAS)
    (entry,) = entries(cache)
    good = (entry / modelcache.TABLES).read_bytes()
    CORRUPTIONS[corruption](entry)
    # A half-made fill of another process is never looked at either.
    (cache / ".fill-deadbeef").mkdir()
    (cache / ".fill-deadbeef" / "MLmodel").write_text("partial")

    loaded = load_model(ALIAS)
    assert "partial or corrupt" in caplog.text or "has no manifest" in caplog.text
    assert loaded.pyfunc_loaded  # downloaded and loaded again, not read from the bad entry
    np.testing.assert_array_equal(loaded.python_model.predict_rides(rides), reference("1", rides))
    (entry,) = entries(cache)  # refilled in place, intact
    assert (entry / modelcache.TABLES).read_bytes() == good
    assert modelcache.lookup(cache, resolve_model(ALIAS)) == entry


def test_a_fill_that_loses_the_race_uses_the_winners_entry(versions, cache):
    ref = resolve_model(ALIAS)
    load_ref(ref)
    (entry,) = entries(cache)
    manifest = (entry / modelcache.MANIFEST).read_text()
    tmp = Path(tempfile.mkdtemp(prefix=".fill-", dir=cache))
    got, pyfunc = modelcache._fill(cache, ref, tmp)  # the rename finds the entry there
    assert got == entry and pyfunc is not None
    assert not tmp.exists() and entries(cache) == [entry]
    assert (entry / modelcache.MANIFEST).read_text() == manifest


def test_concurrent_fills_from_separate_processes(versions, cache, rides):
    set_alias("2")
    script = ("import json, sys\n"
              "from serve.registry import load_model\n"
              "from serve.features import rides_from_rows\n"
              f"m = load_model({ALIAS!r})\n"
              "p = m.python_model.predict_rides(rides_from_rows([(43, 151, 1.8), (1, 2, 0.5)]))\n"
              "print(json.dumps([m.version, p.tolist()]))\n")
    env = dict(os.environ, MODEL_CACHE_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    answers = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(answers) == 1 and json.loads(answers.pop())[0] == "2"
    assert len(entries(cache)) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no fill, no trash
    assert modelcache.lookup(cache, resolve_model(ALIAS)) is not None
    set_alias("1")


def test_the_cache_stays_within_its_bound(versions, cache, monkeypatch):
    load_model(f"models:/{NAME}/1")
    load_model(f"models:/{NAME}/2")
    assert len(entries(cache)) == 2
    monkeypatch.setenv("MODEL_CACHE_MAX_BYTES", "1")  # less than one entry: keep the one in use
    load_model(f"models:/{NAME}/3")
    (only,) = entries(cache)
    assert "-v3-" in only.name
    load_model(f"models:/{NAME}/1")  # filled again; version 3, in use no more, goes
    (only,) = entries(cache)
    assert "-v1-" in only.name


def _count_temp_dirs(tmp: Path) -> int:
    return sum(1 for _ in tmp.iterdir())


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """``tempfile``'s folder for this test only, so other processes' files never count."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


@pytest.fixture(scope="module")
def broken_artifacts(versions, tracking_server) -> str:
    """Version 3 with its artifacts deleted from the server's store."""
    client = MlflowClient()
    model_id = client.get_model_version(NAME, "3").source.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location  # mlflow-artifacts:/...
    folder = tracking_server.home / "mlartifacts" / location.split("mlflow-artifacts:/", 1)[1]
    assert (folder / "MLmodel").is_file(), folder
    shutil.rmtree(folder)
    return "3"


@pytest.fixture
def broken_version(broken_artifacts) -> str:
    """The alias on the version whose artifacts are gone, for one test."""
    set_alias(broken_artifacts)
    yield broken_artifacts
    set_alias("1")


def test_loads_and_failing_polls_leave_no_temporary_folder(versions, broken_version, cache,
                                                           private_tmp, monkeypatch):
    """Issue 14 item 11: N loads (cached and not) and N failing polls, no folder left."""
    before = _count_temp_dirs(private_tmp)
    for _ in range(3):
        load_model(f"models:/{NAME}/1")  # fill once, then cache hits
        load_ref(resolve_model(f"models:/{NAME}/2")).pyfunc  # noqa: B018 - a full load
    holder = ModelHolder(ALIAS, 60, Metrics())  # the web service's poller, alias on broken 3
    for _ in range(4):
        assert holder.poll() is False
    assert holder.metrics.registry.get_sample_value("duration_model_load_failures_total") == 4
    monkeypatch.setenv("MODEL_CACHE_DIR", "off")  # no cache: a temporary folder per load
    for _ in range(3):
        load_model(f"models:/{NAME}/1")
        assert ModelHolder(ALIAS, 60, Metrics()).poll() is False
    assert _count_temp_dirs(private_tmp) == before
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_an_alias_on_a_version_without_artifacts_says_what_to_do(broken_version, cache):
    """Issue 14 item 12: the error names the alias, the version and the way out."""
    with pytest.raises(ModelNotReady) as err:
        load_model(ALIAS)
    message = err.value.message
    assert "alias 'production'" in message and f"version {broken_version} of" in message
    assert NAME in message and "artifacts may be gone" in message
    assert "set_registered_model_alias" in message and "python train.py" in message
    assert not entries(cache)  # nothing of it cached


def test_a_cached_linear_version_serves_without_mlflow(versions, cache):
    """The cold start of web and Lambda with a cached version: no MLflow (nor its server side:
    FastAPI, Flask), no scikit-learn, skops or pandas imported until something needs them."""
    fill = subprocess.run([sys.executable, "-m", "serve.registry", ALIAS], capture_output=True,
                          text=True, env=dict(os.environ, MODEL_CACHE_DIR=str(cache)), cwd=ROOT,
                          timeout=300)  # the documented way to pre-fill the cache
    assert fill.returncode == 0, fill.stderr[-2000:]
    line = json.loads(fill.stdout.strip().splitlines()[-1])
    assert line["version"] == "1" and Path(line["cache_entry"]).parent == cache
    script = ("import sys\n"
              "import serve.web.cli, serve.lambda_function\n"
              "from serve.registry import load_model\n"
              "from serve.features import rides_from_rows\n"
              f"m = load_model({ALIAS!r})\n"
              "m.python_model.predict_rides(rides_from_rows([(43, 151, 1.8)]))\n"
              "heavy = ('mlflow', 'fastapi', 'flask', 'starlette', 'sklearn', 'skops', 'pandas')\n"
              "print(sorted({n.split('.')[0] for n in sys.modules} & set(heavy)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, MODEL_CACHE_DIR=str(cache)), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
