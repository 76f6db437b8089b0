"""Batch scoring: a month of rides in, a predictions parquet out, evaluated in MLflow.

    python -m serve.batch --model-uri models:/duration@production \
        --input data/green_tripdata_2021-03.parquet --output out/
    python -m serve.batch --input 'data/green_tripdata_{month}.parquet' --output s3://b/p \
        --from 2021-01 --to 2021-12           # backfill, skips months already done

Input: a local path, ``s3://``, an ``https://`` TLC URL, or a PostgreSQL table
``postgresql+psycopg2://user@host/db?table=rides&month=2021-03`` (the password from
``PGPASSWORD`` or ``~/.pgpass``, never the command line). It is read
in chunks (parquet row batches, a server-side cursor for PostgreSQL), each chunk
is validated (:func:`serve.features.check_rides`), scored with the model's
vectorized path and appended to the output, so memory does not grow with the
month.

Output (one file per month)::

    OUT/taxi_type=<t>/year=<yyyy>/month=<mm>/predictions.parquet
    OUT/_rejects/taxi_type=<t>/year=<yyyy>/month=<mm>/rejects.parquet

``ride_id`` is ``f"{yyyy}/{mm}_{row}"`` with ``row`` the 0-based position of
the ride in the input (the course's id): stable across re-runs of the same
input. Every row with valid ride fields is scored, whatever its actual
duration; rows with bad ride fields go to the rejects file with the reason.
Both files are written under a hidden temporary name (``.``-prefixed, which
parquet readers and Spark ignore) and moved into place only when complete, so a
crash leaves no output file and a re-run replaces the month, unless it scored nothing,
rejected more than ``--max-reject-ratio`` or read pickups of another month: then the
month's output is left as it was. One run at a time writes a month (a lock).

The parts, lowest first (a module imports only those above it):

* :mod:`~serve.batch.months`: month parsing, TLC names, partition and output URIs;
* :mod:`~serve.batch.coerce`: the column types a file or table carries -> the chunk's;
* :mod:`~serve.batch.core`: pure chunk scoring (schemas, ``Totals``, ``score_chunk``,
  the publish checks);
* :mod:`~serve.batch.output`: atomic publishing (local, S3), stale-temp cleanup, locks;
* :mod:`~serve.batch.sources`: parquet and PostgreSQL readers;
* :mod:`~serve.batch.spark`: the Spark engine, built on core and output;
* :mod:`~serve.batch.run`: ``score_month``, ``backfill``, the evaluation run;
* :mod:`~serve.batch.cli`: the click command (``python -m serve.batch``).
"""
