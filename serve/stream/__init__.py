"""Streaming mode: Kinesis records in -> prediction events and dead letters out.

The parts, lowest first (a module imports only those above it):

* :mod:`~serve.stream.codec`: ride events in, prediction events and dead letters out, Kinesis
  record limits (pure);
* :mod:`~serve.stream.core`: ``StreamService``, one Lambda event -> one vectorized predict ->
  sinks (pure, no boto3);
* :mod:`~serve.stream.sinks`: where records go (Kinesis PutRecords, S3), injected into the core;
* :mod:`~serve.stream.streams`: stream look-ups (identity, one-line errors for a missing one);
* :mod:`~serve.stream.app`: settings -> loaded model + sinks -> a Lambda-style handler;
* :mod:`~serve.stream.checkpoints`: the local runner's per-consumer, per-shard checkpoints,
  tied to the stream's identity;
* :mod:`~serve.stream.events`, :mod:`~serve.stream.pacing`: the event source mapping's
  protocol, and how reads are paced (idle, throttled, endpoint down);
* :mod:`~serve.stream.runner`: the local runner, Lambda's event source mapping on one machine;
  :mod:`~serve.stream.cli` its command line (``python -m serve.stream``);
* :mod:`~serve.stream.produce`: replay a parquet month onto a stream
  (``python -m serve.stream.produce``).
"""
