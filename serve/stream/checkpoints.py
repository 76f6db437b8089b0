"""Per-consumer, per-shard checkpoints of the local runner: the last handled sequence number.

Each consumer of each stream has its own folder (1-to-many); each shard one small
JSON file, written atomically so a crash leaves the old checkpoint or the new one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve.atomic import write_atomic


@dataclass(frozen=True)
class Checkpoints:
    """Last handled sequence number per shard, one small JSON file each."""

    root: Path

    def path(self, shard_id: str) -> Path:
        """File holding the checkpoint of ``shard_id``."""
        return self.root / f"{shard_id}.json"

    def load(self, shard_id: str) -> str | None:
        """The last handled sequence number, or None when the shard was never read."""
        p = self.path(shard_id)
        if not p.exists():
            return None
        return json.loads(p.read_text())["sequenceNumber"]

    def save(self, shard_id: str, sequence_number: str) -> None:
        """Write atomically (temp file + fsync + rename): a crash leaves the old or the new."""
        body = json.dumps({"sequenceNumber": sequence_number, "updatedAt": time.time()})
        write_atomic(self.path(shard_id), body, durable=True)


@dataclass
class DryRunCheckpoints:
    """A dry run (``--test-run``) starts at the consumer's checkpoints but never moves them:
    the next real run of that consumer must still see every record."""

    real: Checkpoints
    moved: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The real consumer's folder (read, never written)."""
        return self.real.root

    def load(self, shard_id: str) -> str | None:
        """Where this dry run is, else where the real consumer is."""
        return self.moved.get(shard_id) or self.real.load(shard_id)

    def save(self, shard_id: str, sequence_number: str) -> None:
        """Remember in memory only."""
        self.moved[shard_id] = sequence_number


def consumer_checkpoints(base: str | Path, consumer: str, stream: str) -> Checkpoints:
    """Each consumer of each stream has its own checkpoints (1-to-many)."""
    return Checkpoints(Path(base) / consumer / stream)
