"""Per-consumer, per-shard checkpoints of the local runner: the last handled sequence number,
and the identity of the stream it belongs to.

Each consumer of each stream has its own folder (1-to-many); each shard one small
JSON file, written atomically so a crash leaves the old checkpoint or the new one.
A sequence number means something only in the stream that gave it: a stream deleted
and created again under the same name starts its numbers over, so resuming from an
old checkpoint would skip records. The stream's identity (ARN + creation time) is
stored with each checkpoint, and the runner refuses one of another stream.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve.atomic import write_atomic
from serve.stream.streams import StreamIdentity

NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,128}")  # never "." or ".."


@dataclass(frozen=True)
class Checkpoints:
    """Last handled sequence number per shard, one small JSON file each."""

    root: Path

    def path(self, shard_id: str) -> Path:
        """File holding the checkpoint of ``shard_id``."""
        return self.root / f"{shard_id}.json"

    def read(self, shard_id: str) -> tuple[str | None, StreamIdentity | None]:
        """(last handled sequence number, stream it belongs to); (None, None) if never read."""
        p = self.path(shard_id)
        if not p.exists():
            return None, None
        data = json.loads(p.read_text())
        return data["sequenceNumber"], StreamIdentity.from_json(data.get("stream"))

    def load(self, shard_id: str) -> str | None:
        """The last handled sequence number, or None when the shard was never read."""
        return self.read(shard_id)[0]

    def save(self, shard_id: str, sequence_number: str,
             stream: StreamIdentity | None = None) -> None:
        """Write atomically (temp file + fsync + rename): a crash leaves the old or the new."""
        body = {"sequenceNumber": sequence_number, "updatedAt": time.time()}
        if stream is not None:
            body["stream"] = stream.to_json()
        write_atomic(self.path(shard_id), json.dumps(body), durable=True)

    def foreign(self, stream: StreamIdentity) -> dict[str, StreamIdentity]:
        """Checkpoints recorded for another stream than ``stream`` (shard id -> its stream).
        A checkpoint without an identity (an older version wrote it) is taken as ours."""
        out = {}
        for p in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            recorded = self.read(p.stem)[1]
            if recorded is not None and recorded != stream:
                out[p.stem] = recorded
        return out

    def reset(self) -> None:
        """Forget every shard's position: the next read starts at ``TRIM_HORIZON``."""
        for p in self.root.glob("*.json") if self.root.is_dir() else []:
            p.unlink()


@dataclass
class DryRunCheckpoints:
    """A dry run (``--test-run``) starts at the consumer's checkpoints but never moves them:
    the next real run of that consumer must still see every record."""

    real: Checkpoints
    moved: dict[str, str] = field(default_factory=dict)
    from_start: bool = False  # reset(): ignore the real checkpoints

    @property
    def root(self) -> Path:
        """The real consumer's folder (read, never written)."""
        return self.real.root

    def load(self, shard_id: str) -> str | None:
        """Where this dry run is, else where the real consumer is."""
        if shard_id in self.moved or self.from_start:
            return self.moved.get(shard_id)
        return self.real.load(shard_id)

    def save(self, shard_id: str, sequence_number: str,
             stream: StreamIdentity | None = None) -> None:
        """Remember in memory only."""
        self.moved[shard_id] = sequence_number

    def foreign(self, stream: StreamIdentity) -> dict[str, StreamIdentity]:
        """As the real consumer's (none after :meth:`reset`)."""
        return {} if self.from_start else self.real.foreign(stream)

    def reset(self) -> None:
        """Start from ``TRIM_HORIZON`` in memory; the real checkpoints stay as they are."""
        self.moved.clear()
        self.from_start = True


def consumer_checkpoints(base: str | Path, consumer: str, stream: str) -> Checkpoints:
    """Each consumer of each stream has its own checkpoints (1-to-many)."""
    for what, name in (("consumer", consumer), ("stream", stream)):
        if not NAME.fullmatch(name):  # both become folder names
            raise ValueError(f"{what} name {name!r}: use 1-128 letters, digits, '_', '.', '-'")
    return Checkpoints(Path(base) / consumer / stream)
