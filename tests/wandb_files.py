"""Read an offline W&B run back from its ``run-*.wandb`` file (tests only).

Recent wandb releases write the file from their Go core and ship no Python reader, so the tests
read the record log themselves: a 7-byte header (``:W&B``, magic, version), then records in
32 KiB blocks, each ``crc32 | length | type`` + a protobuf ``Record`` (full, or split into
first / middle / last pieces). The protobuf classes are wandb's own.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = 7, b""
    while pos + HEADER.size <= len(data):
        space = BLOCK - pos % BLOCK
        if space < HEADER.size:
            pos += space
            continue
        crc, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += space
            continue
        if pos + HEADER.size + length > len(data):  # still being written
            return
        body = data[pos + HEADER.size : pos + HEADER.size + length]
        if zlib.crc32(bytes([kind]) + body) != crc:
            raise ValueError(f"corrupt record at byte {pos}")
        pos += HEADER.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body


def _records(path: Path, timeout: float) -> list[Any]:
    """The file's records, once W&B's core has written the closing ``exit`` record.

    ``run.finish()`` can return before the core process has flushed the file to disk.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for chunk in _chunks(path.read_bytes()):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.2)


def read_run(run_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """``{"history": [{key: value}], "summary": {key: value}, "config": {key: value}}``."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    for rec in _records(path, timeout):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "summary":
            for i in rec.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind in ("config", "run"):
            for i in (rec.config if kind == "config" else rec.run.config).update:
                out["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
