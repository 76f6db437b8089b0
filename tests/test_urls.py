"""serve.urls.masked: the one helper every printed or logged URL goes through."""

from __future__ import annotations

import pytest

from serve.urls import has_password, masked


@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql+psycopg2://mlflow:s3cret@db:5432/m?table=rides&month=2021-03",
     "postgresql+psycopg2://mlflow:***@db:5432/m?table=rides&month=2021-03"),
    # unescaped @ and / inside the password: masked whole, never half
    ("postgresql://u:p@ss/w@rd@h/db", "postgresql://u:***@h/db"),
    ("http://admin:pw%40x@127.0.0.1:5000", "http://admin:***@127.0.0.1:5000"),
    ("postgresql://u@h/db?password=hunter2&table=t", "postgresql://u@h/db?password=***&table=t"),
    ("https://b.s3.amazonaws.com/k.parquet?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123",
     "https://b.s3.amazonaws.com/k.parquet?X-Amz-Credential=***&X-Amz-Signature=***"),
])
def test_masked_hides_every_secret_and_keeps_the_rest(uri, shown):
    assert masked(uri) == shown
    assert has_password(uri)
    for secret in ("s3cret", "p@ss", "w@rd", "pw%40x", "hunter2", "AKIA", "abc123"):
        assert secret not in masked(uri)


@pytest.mark.parametrize("uri", [
    "data/green_tripdata_2021-03.parquet", "/tmp/a:b@c.parquet", "s3://bucket/k@x/f.parquet",
    "https://d37ci6vzurychx.cloudfront.net/trip-data/green_tripdata_2021-03.parquet",
    "postgresql+psycopg2://reader@db/rides?table=t", "https://host/a:b@c",
    "models:/duration@production", "http://127.0.0.1:5000", "",
])
def test_masked_leaves_urls_without_secrets_alone(uri):
    assert masked(uri) == uri and not has_password(uri)
