"""Read an offline W&B run back from its files with wandb's own reader (tests only).

wandb ships its transaction-log reader in its core binary, behind ``wandb leet inspect --json``:
one JSON object per record (``run``, ``config``, ``history``, ``summary``, ``exit``, ...).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WANDB = str(Path(sys.executable).with_name("wandb"))


def records(run_dir: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The run's records, once W&B's core has written the closing ``exit`` record
    (``run.finish()`` can return before the file is flushed)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            [WANDB, "leet", "inspect", "--json", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if any(r["type"] == "exit" for r in out):
            return out
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_dir} has no exit record after {timeout} s")
        time.sleep(0.5)


def read_run(run_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """``history`` (one dict per logged step), ``summary``, ``config`` (without W&B's own
    ``_wandb``), ``group``, ``tags``, ``job_type`` and ``exit_code`` of an offline run."""
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    for rec in records(run_dir, timeout):
        kind, body = rec["type"], rec.get(rec["type"], {})
        if kind == "run":
            out.update(
                group=body.get("run_group"),
                tags=body.get("tags", []),
                job_type=body.get("job_type"),
            )
            out["config"].update(body.get("config", {}).get("update", {}))
        elif kind == "config":
            out["config"].update(body.get("update", {}))
        elif kind == "history":
            out["history"].append(body["item"])
        elif kind == "summary":
            out["summary"].update(body.get("update", {}))
        elif kind == "exit":
            out["exit_code"] = body.get("exit_code", 0)
    out["config"].pop("_wandb", None)
    return out
