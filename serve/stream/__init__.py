"""Streaming mode: Kinesis records in -> prediction events and dead letters out.

The parts, lowest first (a module imports only those above it):

* :mod:`~serve.stream.core`: ``StreamService`` and the event decoding/encoding (pure, no boto3);
* :mod:`~serve.stream.sinks`: where records go (Kinesis PutRecords, S3), injected into the core;
* :mod:`~serve.stream.app`: settings -> loaded model + sinks -> a Lambda-style handler;
* :mod:`~serve.stream.checkpoints`: the local runner's per-consumer, per-shard checkpoints;
* :mod:`~serve.stream.runner`: the local runner, Lambda's event source mapping on one machine
  (``python -m serve.stream``);
* :mod:`~serve.stream.produce`: replay a parquet month onto a stream
  (``python -m serve.stream.produce``).
"""
