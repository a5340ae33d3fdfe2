"""Streamed updates through Redis Streams (issue 18 item 1): a trainer publishes (model, table, keys, rows) messages
to a stream; every inference server reads them in its own consumer group and applies each through
`HierarchicalParameterServer.update()` - the tiers, then every device's cache, versioned - so no reader sees a stale
or torn row. At-least-once: a message is acknowledged (XACK) only after its update returned; a server that stopped
before acknowledging gets it again when it starts (its pending entries are read first).

Message (one stream entry): model (str), table (str name or int id), dim (int), keys (int64 little-endian bytes),
rows (float32 little-endian bytes, keys x dim) - HPS's Kafka messages carried the same raw key and row bytes.

    >>> publish(redis.Redis(port=6379), "hps_updates", "demo", "user", keys, rows)   # a trainer
    >>> # a server: config update_source {type: redis_stream, brokers: "127.0.0.1:6379", group: "server-a"}

A message that can never apply (unknown model or table, sizes that do not match, undecodable bytes) is acknowledged
and counted as failed (it would otherwise come back forever); an update that fails for another reason (a tier
down) stays pending and is retried after `failure_backoff_ms`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["publish", "StreamConsumer"]


def publish(client: Any, stream: str, model: str, table: int | str, keys: Any, rows: Any,
            chunk_rows: int = 8192) -> list[bytes]:
    """Append update messages for `keys` (n,) int and `rows` (n, dim) float32 (numpy or torch) to `stream`, at most
    `chunk_rows` rows per message, in one round trip; returns the entry ids."""
    k = np.ascontiguousarray(_numpy(keys), dtype="<i8").reshape(-1)
    r = np.ascontiguousarray(_numpy(rows), dtype="<f4")
    if r.ndim != 2 or r.shape[0] != k.size:
        raise ValueError(f"rows must have shape ({k.size}, dim), found {tuple(r.shape)}")
    pipe = client.pipeline(transaction=False)
    for s in range(0, k.size, chunk_rows):
        pipe.xadd(stream, {"model": model, "table": str(table), "dim": str(r.shape[1]),
                           "keys": k[s:s + chunk_rows].tobytes(), "rows": r[s:s + chunk_rows].tobytes()})
    return pipe.execute()


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class _BadMessage(ValueError):
    """A message that can never apply."""


class StreamConsumer:
    """Reads `stream` in consumer group `group` as `consumer` and applies every message to `server` (a thread).

    Args:
        server: the HierarchicalParameterServer to update. client: a redis.Redis (not a cluster client: a stream
            lives on one node). stream, group, consumer: names. batch: entries per read. block_ms: how long one
            read waits for new entries. backoff_ms: pause after an update that failed for a retryable reason.
    """

    def __init__(self, server: Any, client: Any, stream: str, group: str, consumer: str = "c0", batch: int = 64,
                 block_ms: int = 500, backoff_ms: int = 50) -> None:
        import redis

        self.server, self.client = server, client
        self.stream, self.group, self.consumer = stream, group, consumer
        self.batch, self.block_ms, self.backoff_ms = int(batch), int(block_ms), int(backoff_ms)
        self.applied_messages = self.applied_rows = self.failed_messages = self.retries = 0
        self._stop = threading.Event()
        try:  # from the stream's start: a new group sees every update published so far
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._thread = threading.Thread(target=self._run, name=f"hps-updates-{group}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending_first = True  # this consumer's unacknowledged entries (a restart) before new ones
        while not self._stop.is_set():
            try:
                start = "0" if pending_first else ">"
                reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self.batch,
                                               block=None if pending_first else self.block_ms)
                entries = reply[0][1] if reply else []
                if pending_first and not entries:
                    pending_first = False
                    continue
                for entry_id, fields in entries:
                    if self._stop.is_set():
                        return
                    if not fields:  # a pending entry deleted from the stream: nothing to apply
                        self.client.xack(self.stream, self.group, entry_id)
                        continue
                    self._apply(entry_id, fields)
            except Exception:  # noqa: BLE001 - the consumer keeps going; the entry stays pending
                if self._stop.is_set():
                    return
                self.retries += 1
                log.exception("update stream %s: applying failed, retrying in %d ms", self.stream, self.backoff_ms)
                pending_first = True
                self._stop.wait(self.backoff_ms / 1e3)

    def _apply(self, entry_id: bytes, fields: dict) -> None:
        try:
            model, table, keys, rows = self._decode(fields)
        except _BadMessage as exc:
            log.error("update stream %s: entry %s dropped: %s", self.stream, entry_id, exc)
            self.failed_messages += 1
            self.client.xack(self.stream, self.group, entry_id)
            return
        self.server.update(model, table, keys, rows)  # an exception leaves the entry pending (retried)
        self.client.xack(self.stream, self.group, entry_id)
        self.applied_messages += 1
        self.applied_rows += keys.numel()

    def _decode(self, fields: dict) -> tuple[str, int | str, torch.Tensor, torch.Tensor]:
        try:
            model = fields[b"model"].decode()
            table_raw = fields[b"table"].decode()
            dim = int(fields[b"dim"])
            keys = np.frombuffer(fields[b"keys"], dtype="<i8")
            rows = np.frombuffer(fields[b"rows"], dtype="<f4")
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise _BadMessage(f"undecodable ({exc!r})") from None
        table: int | str = int(table_raw) if table_raw.isdigit() else table_raw
        try:
            rt = self.server.table(model, table)
        except (KeyError, TypeError) as exc:
            raise _BadMessage(str(exc)) from None
        if dim != rt.dim or rows.size != keys.size * dim:
            raise _BadMessage(f"{keys.size} keys and {rows.size} floats of dim {dim} for {rt.tag} (dim {rt.dim})")
        return model, table, torch.from_numpy(keys.copy()), torch.from_numpy(rows.copy()).view(-1, dim)

    def lag(self) -> int:
        """Entries of the stream not yet delivered to this group plus those delivered but not acknowledged."""
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                  for g in self.client.xinfo_groups(self.stream)}
        g = groups.get(self.group, {})
        return int(g.get("lag") or 0) + int(g.get("pending") or 0)

    def stats(self) -> dict:
        return {"applied_messages": self.applied_messages, "applied_rows": self.applied_rows,
                "failed_messages": self.failed_messages, "retries": self.retries, "lag": self.lag()}

    def close(self) -> None:
        """Stop reading (the message being applied finishes). Idempotent."""
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.block_ms / 1e3))
