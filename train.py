"""Train the ride-duration model on a TLC month, register it, promote it if it wins.

    python train.py --train data/green_tripdata_2021-01.parquet \
                    --val data/green_tripdata_2021-02.parquet
    mlflow run . --env-manager local --experiment-name duration -P train=... -P val=...
                                      # or --env-manager uv (no conda)

``--train``/``--val`` take a local path, an ``s3://`` URI or an ``https://``
URL (the public TLC files). The logged model is a pyfunc that takes raw rides;
it is registered as ``duration`` and becomes production (alias ``production``
and stage ``Production``) only if its validation RMSE beats the current
production version's RMSE on the same validation data.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd

from serve import registry
from serve.cli import Command
from serve.config import (
    PRODUCTION_ALIAS,
    PRODUCTION_STAGE,
    REGISTERED_MODEL_NAME,
    require_tracking_server,
    use_tracking_server,
)
from serve.errors import InvalidInput
from serve.features import RIDE_COLUMNS, ride_dicts, validate_rides
from serve.logs import setup_logging
from serve.model import RideDurationModel
from serve.tlc import read_training_frame

log = logging.getLogger("train")

# The models-from-code file logged as the model, and the files of the ``serve`` package it
# imports: copied into the model (code_paths) so it loads anywhere.
MODEL_CODE_FILE = Path(__file__).resolve().parent / "serve" / "model_code.py"
MODEL_CODE = ("__init__.py", "errors.py", "features.py", "model.py", "tables.py")


def build_estimator(kind: str, n_estimators: int, max_depth: int, min_samples_leaf: int):
    """The estimator behind the DictVectorizer: 'lr' (default) or 'rf'."""
    if kind == "lr":
        from sklearn.linear_model import LinearRegression

        return LinearRegression()
    if kind == "rf":
        from sklearn.ensemble import RandomForestRegressor

        return RandomForestRegressor(n_estimators=n_estimators, max_depth=max_depth or None,
                                     min_samples_leaf=min_samples_leaf, n_jobs=-1, random_state=0)
    raise click.BadParameter(f"model must be lr or rf, got {kind!r}")


def read_month(uri: str, option: str) -> pd.DataFrame:
    """The month behind ``option`` (``--train``, ...); a bad one is an error naming the option."""
    try:
        return read_training_frame(uri)
    except InvalidInput as e:
        hint = ""
        if e.message.startswith("no such file"):
            hint = (" (write a synthetic month with `python -m ops.synth --month YYYY-MM`, or "
                    "pass a TLC URL)")
        raise InvalidInput(f"{option}: {e.message}{hint}", field=option) from e


def fit_model(train_df: pd.DataFrame, estimator) -> RideDurationModel:
    """Fit the course-style DictVectorizer + estimator, building features vectorized."""
    from sklearn.feature_extraction import DictVectorizer

    # The vocabulary only depends on which PU_DO pairs occur: fit it on the distinct pairs.
    pairs = train_df[list(RIDE_COLUMNS)].drop_duplicates(["PULocationID", "DOLocationID"])
    vectorizer = DictVectorizer().fit(ride_dicts(pairs))
    model = RideDurationModel(vectorizer, estimator)
    X = model.transform(validate_rides(train_df))
    estimator.fit(X, train_df["duration"].to_numpy())
    if hasattr(estimator, "n_jobs"):
        estimator.n_jobs = 1  # thread start-up would cost ~150 ms per served call
    return RideDurationModel(vectorizer, estimator)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """RMSE and MAE in minutes."""
    err = np.asarray(y_pred, dtype=np.float64) - y_true
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


@dataclass
class Decision:
    """Outcome of the promotion gate."""

    promoted: bool
    reason: str
    champion_version: str | None = None
    champion_rmse: float | None = None


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def registered_rmse(name: str, version: str, val_df: pd.DataFrame) -> float:
    """RMSE on ``val_df`` of version ``version`` as the registry serves it (loaded back)."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    return scores(val_df["duration"].to_numpy(), model.predict(val_df[list(RIDE_COLUMNS)]))["rmse"]


def champion_rmse(client, name: str, val_df: pd.DataFrame
                  ) -> tuple[str, float | None, str | None] | None:
    """Current production version, its RMSE on ``val_df`` and, when it cannot be loaded, why
    (RMSE None); None if there is no production version."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, PRODUCTION_ALIAS)
    except MlflowException:
        return None
    try:
        return str(champion.version), registered_rmse(name, str(champion.version), val_df), None
    except Exception as e:  # noqa: BLE001 - a champion that cannot be loaded has lost
        return str(champion.version), None, _one_line(e)


def _decide(client, name: str, version: str, val_rmse: float, val_df: pd.DataFrame) -> Decision:
    try:  # the candidate as the registry serves it: incomplete artifacts are never promoted
        served = registered_rmse(name, version, val_df)
    except Exception as e:  # noqa: BLE001
        client.set_model_version_tag(name, version, "integrity", "unreadable")
        return Decision(False, f"version {version} cannot be loaded back from the registry "
                               f"({_one_line(e)})")
    if not np.isclose(served, val_rmse, rtol=1e-6):
        return Decision(False, f"version {version} as served scores val_rmse {served:.4f}, "
                               f"not the {val_rmse:.4f} it was trained to")
    champion = champion_rmse(client, name, val_df)
    if champion is None:
        return Decision(True, "first production version")
    champ_version, champ_rmse, unreadable = champion
    if unreadable:
        client.set_model_version_tag(name, champ_version, "integrity", "unreadable")
        client.set_model_version_tag(name, champ_version, "demotion_reason",
                                     f"cannot be loaded ({unreadable}); replaced by version "
                                     f"{version}")
        return Decision(True, f"production version {champ_version} cannot be loaded "
                              f"({unreadable}): it lost", champ_version)
    if val_rmse < champ_rmse:
        return Decision(True, f"val_rmse {val_rmse:.4f} beats version {champ_version}'s "
                              f"{champ_rmse:.4f}", champ_version, champ_rmse)
    return Decision(False, f"val_rmse {val_rmse:.4f} does not beat version {champ_version}'s "
                           f"{champ_rmse:.4f} on the same validation data", champ_version,
                    champ_rmse)


def promote_if_better(client, name: str, version: str, val_rmse: float,
                      val_df: pd.DataFrame) -> Decision:
    """Promote ``version`` when it loads back from the registry and beats the production
    version on the same validation data; a production version that cannot be loaded has
    lost (it is tagged with the reason). Never raises: the version is registered already,
    so a failing gate leaves it unpromoted with the reason, and the run still finishes."""
    try:
        decision = _decide(client, name, version, val_rmse, val_df)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.exception("promotion gate failed for version %s", version)
        decision = Decision(False, f"promotion gate failed: {_one_line(e)}")
    try:
        client.set_model_version_tag(name, version, "val_rmse", f"{val_rmse:.6f}")
        client.set_model_version_tag(name, version, "promotion",
                                     "promoted" if decision.promoted else "rejected")
        client.set_model_version_tag(name, version, "promotion_reason", decision.reason)
        if decision.promoted:
            client.set_registered_model_alias(name, PRODUCTION_ALIAS, version)
            with warnings.catch_warnings():  # stages are deprecated but still resolved by users
                warnings.simplefilter("ignore", FutureWarning)
                client.transition_model_version_stage(name, version, PRODUCTION_STAGE,
                                                      archive_existing_versions=True)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.exception("promotion of version %s failed", version)
        decision = Decision(False, f"{decision.reason}; then promotion failed: {_one_line(e)}",
                            decision.champion_version, decision.champion_rmse)
    return decision


def model_code_dir(dest: Path) -> Path:
    """A copy of just the model's code (``serve`` package subset) to ship inside the model."""
    src = Path(__file__).resolve().parent / "serve"
    pkg = dest / "serve"
    pkg.mkdir(parents=True)
    for name in MODEL_CODE:
        shutil.copy2(src / name, pkg / name)
    return pkg


def pip_requirements() -> list[str]:
    """Pinned requirements of the model's code, for MLflow-built environments and images."""
    import mlflow
    import scipy
    import sklearn
    import skops

    return [f"mlflow=={mlflow.__version__}", f"scikit-learn=={sklearn.__version__}",
            f"pandas=={pd.__version__}", f"numpy=={np.__version__}", f"scipy=={scipy.__version__}",
            f"skops=={skops.__version__}"]


def model_signature():
    """The contract: the three ride columns in, minutes out (written, not inferred)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "PULocationID"), ColSpec("long", "DOLocationID"),
                     ColSpec("double", "trip_distance")])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype("float64"), (-1,))]))


def model_files(model: RideDurationModel, folder: Path, example) -> dict:
    """Write what a logged model is made of under ``folder`` and return it as keyword arguments
    of ``mlflow.pyfunc.log_model``/``save_model``: the models-from-code file, the state as
    artifacts, the ``serve`` files it imports, the pinned requirements, the signature and
    ``example`` (a few rides: a DataFrame or records) as the input example."""
    state = folder / "state"
    state.mkdir(parents=True)
    example = pd.DataFrame(example)[list(RIDE_COLUMNS)].reset_index(drop=True)
    # Object column labels: MLflow compares pandas 3's string labels with a range, which pandas
    # deprecates (a warning on every run).
    example.columns = example.columns.astype(object)
    return {"python_model": str(MODEL_CODE_FILE), "artifacts": model.save_state(state),
            "code_paths": [str(model_code_dir(folder / "code"))],
            "pip_requirements": pip_requirements(), "signature": model_signature(),
            "input_example": example}


def run_training(train: str, val: str, model: str = "lr", n_estimators: int = 50,
                 max_depth: int = 20, min_samples_leaf: int = 5, train_rows: int = 0,
                 experiment: str = "duration", registered_model: str = REGISTERED_MODEL_NAME,
                 seed: int = 0, test: str | None = None) -> dict:
    """Train, log, register and gate one model; returns a summary dict."""
    import mlflow
    from mlflow.tracking import MlflowClient

    require_tracking_server(use_tracking_server())

    train_df = read_month(train, "--train")
    val_df = read_month(val, "--val")
    test_df = read_month(test, "--test") if test else None
    if train_rows and train_rows < len(train_df):
        train_df = train_df.sample(n=train_rows, random_state=seed).reset_index(drop=True)
    for option, df in (("--train", train_df), ("--val", val_df)):
        if df.empty:
            raise InvalidInput(f"{option}: no ride of 1 to 60 minutes with valid fields in "
                               f"{train if option == '--train' else val}", field=option)

    estimator = build_estimator(model, n_estimators, max_depth, min_samples_leaf)
    # Under `mlflow run` the run (and its experiment) is given to us: respect it.
    experiment_id = None if os.getenv("MLFLOW_RUN_ID") else registry.experiment_id(experiment)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        if experiment_id is None and run.info.experiment_id == "0":  # mlflow run, no flag
            log.warning("this run is in experiment Default: give `mlflow run` "
                        "--experiment-name %s to keep runs together", experiment)
        mlflow.log_params({"model": model, "train": train, "val": val,
                           "train_rows_limit": train_rows})
        if model == "rf":
            mlflow.log_params({"n_estimators": n_estimators, "max_depth": max_depth,
                               "min_samples_leaf": min_samples_leaf})
        log.info("fitting %s on %d rows", model, len(train_df))
        ride_model = fit_model(train_df, estimator)
        metrics = {"train_rows": len(train_df), "val_rows": len(val_df)}
        splits = [("train", train_df), ("val", val_df)]
        if test_df is not None:  # a held-out month, reported only: it never drives promotion
            splits.append(("test", test_df))
            metrics["test_rows"] = len(test_df)
            mlflow.log_param("test", test)
        for split, df in splits:
            pred = ride_model.predict_frame(df)
            for k, v in scores(df["duration"].to_numpy(), pred).items():
                metrics[f"{split}_{k}"] = v
        mlflow.log_metrics(metrics)
        log.info("train_rmse=%.4f val_rmse=%.4f%s", metrics["train_rmse"], metrics["val_rmse"],
                 f" test_rmse={metrics['test_rmse']:.4f}" if test_df is not None else "")

        with tempfile.TemporaryDirectory() as tmp:
            info = mlflow.pyfunc.log_model(name="model", registered_model_name=registered_model,
                                           **model_files(ride_model, Path(tmp), val_df.head(3)))
        version = str(info.registered_model_version)
        client = MlflowClient()
        decision = promote_if_better(client, registered_model, version, metrics["val_rmse"],
                                     val_df)
        mlflow.set_tags({"promoted": str(decision.promoted).lower(),
                         "promotion_reason": decision.reason,
                         "registered_version": version})
        if decision.promoted:
            log.info("version %s of %r is now production: %s", version, registered_model,
                     decision.reason)
        else:
            log.warning("version %s of %r NOT promoted: %s", version, registered_model,
                        decision.reason)
    return {"run_id": run.info.run_id, "version": version, "promoted": decision.promoted,
            "reason": decision.reason, **metrics}


@click.command(cls=Command)
@click.option("--train", "train", required=True,
              help="Training month: local path, s3:// URI or https:// URL of a TLC parquet file.")
@click.option("--val", "val", required=True, help="Validation month, same forms as --train.")
@click.option("--model", type=click.Choice(["lr", "rf"]), default="lr", show_default=True,
              help="Estimator: linear regression or random forest.")
@click.option("--n-estimators", type=float, default=50, show_default=True,
              help="rf: number of trees.")
@click.option("--max-depth", type=float, default=20, show_default=True,
              help="rf: maximum tree depth (0 = unlimited).")
@click.option("--min-samples-leaf", type=float, default=5, show_default=True,
              help="rf: minimum samples per leaf.")
@click.option("--train-rows", type=float, default=0, show_default=True,
              help="Train on a random sample of this many rows (0 = all).")
@click.option("--test", "test", default=None,
              help="Optional held-out month (same forms as --train): test_rmse/test_mae logged.")
@click.option("--experiment", default="duration", show_default=True,
              envvar="MLFLOW_EXPERIMENT_NAME",
              help="Experiment for runs not started by `mlflow run` (env MLFLOW_EXPERIMENT_NAME).")
@click.option("--registered-model", default=REGISTERED_MODEL_NAME, show_default=True,
              help="Registered model name.")
def main(train, val, model, n_estimators, max_depth, min_samples_leaf, train_rows, test,
         experiment, registered_model):
    """Train on one TLC month, validate on another, register and gate the model."""
    setup_logging("INFO")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    summary = run_training(train, val, model, int(n_estimators), int(max_depth),
                           int(min_samples_leaf), int(train_rows), experiment, registered_model,
                           test=test or None)
    test_part = f"test_rmse={summary['test_rmse']:.4f} " if "test_rmse" in summary else ""
    verdict = "promoted" if summary["promoted"] else "not promoted"
    click.echo(f"run {summary['run_id']}: version {summary['version']} "
               f"val_rmse={summary['val_rmse']:.4f} {test_part}{verdict} ({summary['reason']})")

if __name__ == "__main__":
    main()
