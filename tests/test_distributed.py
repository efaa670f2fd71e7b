"""Data-parallel runs: 2 gloo ranks on loopback against one process on the same global batches.

Every multi-process test starts its own processes on 127.0.0.1 with a free port and bounds its
wait, so a broken collective fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import metahpo
from metahpo import distributed
from metahpo.estimators.checkpointed_reverse import CheckpointedReverse
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.greedy import Greedy
from metahpo.estimators.truncated_reverse import TruncatedReverse
from metahpo.inner import FlatTask
from tests.conftest import make_schedule, small_digits
from tests.test_batchnorm import tiny_wrn

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["task=quadratic", "experiment=smoke", "progress=false"]
RTOL = 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rel_err(got: list[float] | torch.Tensor, want: list[float] | torch.Tensor) -> float:
    """Largest difference relative to the largest reference entry (absolute when that is 0)."""
    g, w = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    scale = float(w.abs().max()) if w.numel() else 0.0
    return float((g - w).abs().max()) / (scale or 1.0) if w.numel() else 0.0


def rank_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun sets for a worker (without its elastic agent)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


# -- in one process: shards, shares, config ---------------------------------------------------
def test_one_process_is_untouched() -> None:
    batch = (torch.arange(6.0), torch.arange(6))
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(batch) is batch
    assert distributed.share(5) == range(5)
    t = torch.ones(3)
    assert distributed.all_reduce_mean_(t) is t and distributed.all_reduce_mean(t) is t


def test_shards_and_shares_split_evenly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    xs, ys = distributed.shard((x, y))
    assert torch.equal(xs, x[2:]) and torch.equal(ys, y[2:])
    assert distributed.share(5) == range(2, 5)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.share(5) == range(0, 2)
    with pytest.raises(metahpo.ConfigError, match=r"task.batch_size=3 must be divisible by the 2"):
        distributed.shard((x[:3], y[:3]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distributed.backend=mpi", "distributed.backend='mpi' is unknown; allowed: auto, gloo"),
        ("distributed.timeout=0", "distributed.timeout=0 must be a number > 0"),
    ],
)
def test_bad_distributed_config_is_one_line(override: str, message: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=message):
        metahpo.compose([*QUICK, override])


# -- two ranks in process: the pieces ---------------------------------------------------------
def _pieces(rank: int) -> dict[str, Any]:
    """Hypergradients of every data-parallel estimator on digits and on a batch-norm WRN."""
    out: dict[str, Any] = {}
    task = small_digits()
    schedule = make_schedule(9, 3)
    flat = FlatTask(task)
    out["batch"] = flat.batch(4)
    for name, est in (
        ("forward", ForwardMode()),
        ("forward_fwd_rev_chunked", ForwardMode(hvp="fwd_rev", chunk_size=4)),
        ("forward_auto", ForwardMode(hvp="auto")),  # ranks must time to the same choice
        ("truncated", TruncatedReverse(K=5)),
        ("checkpointed", CheckpointedReverse(stretch=4)),  # local adjoints carried over
        ("greedy", Greedy(W=4, update="gradient")),
    ):
        hg = est.hypergradient(task, schedule)
        out[name] = (hg.meta_loss, hg.grads, None if hg.schedule is None else hg.schedule.values)
    wrn = tiny_wrn()
    hg = ForwardMode().hypergradient(wrn, make_schedule(4, 2))
    flat_wrn = FlatTask(wrn)
    steps = metahpo.Steps(flat_wrn, make_schedule(4, 2))
    state = metahpo.train(flat_wrn, steps, steps.init_state(flat_wrn), 4)
    out["bn"] = (hg.meta_loss, hg.grads, state.buffers)
    for key, build in (
        ("exact_reverse", lambda: distributed.check(task, ExactReverse(), "exact_reverse")),
        ("odd_batch", lambda: distributed.check(small_digits(batch_size=33), ForwardMode(), "f")),
    ):
        try:
            build()
            out[key] = None
        except metahpo.ConfigError as e:
            out[key] = str(e)
    return out


def _pieces_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, port))
    torch.set_num_threads(1)
    distributed.join(metahpo.compose(QUICK))
    assert distributed.world_size() == 2
    torch.save(_pieces(rank), Path(out) / f"rank{rank}.pt")


def test_two_ranks_equal_one_process_piece_by_piece(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _pieces_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn",
        join=False,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the two ranks did not finish in 240 s"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single = _pieces(0)

    # each rank takes its half of the global batch
    x, y = small_digits().batch(4)
    for r, got in enumerate(ranks):
        assert torch.equal(got["batch"][0], x[16 * r : 16 * (r + 1)])
        assert torch.equal(got["batch"][1], y[16 * r : 16 * (r + 1)])
    # every estimator's hypergradient equals the one-process one; the ranks agree bit for bit
    every = ("forward", "forward_fwd_rev_chunked", "forward_auto", "truncated", "checkpointed")
    for name in (*every, "greedy"):
        loss, grads, moved = single[name]
        for got in ranks:
            assert got[name][0] == pytest.approx(loss, rel=RTOL)
            for n, g in grads.items():
                assert rel_err(got[name][1][n], g) <= RTOL, (name, n)
            if moved is not None:  # greedy's schedule after its online steps
                for n, v in moved.items():
                    assert rel_err(got[name][2][n], v) <= RTOL, (name, n)
        for n in grads:
            assert torch.equal(ranks[0][name][1][n], ranks[1][name][1][n])
        assert grads["lr"].abs().max() > 0
    # batch norm: per-rank batch statistics (not the one-process run), identical ranks
    assert ranks[0]["bn"][0] == ranks[1]["bn"][0]
    for n in ranks[0]["bn"][1]:
        assert torch.equal(ranks[0]["bn"][1][n], ranks[1]["bn"][1][n])
    for k, b in ranks[0]["bn"][2].items():
        assert torch.equal(b, ranks[1]["bn"][2][k]), k
    # what cannot run data-parallel says so in one line
    for got in ranks:
        assert got["exact_reverse"].startswith(
            "estimator=exact_reverse does not support data-parallel runs (2 ranks)"
        )
        assert got["odd_batch"].startswith("task.batch_size=33 must be divisible by the 2")
        assert single["exact_reverse"] is None and single["odd_batch"] is None


# -- torchrun end to end ----------------------------------------------------------------------
def torchrun(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "metahpo", *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_torchrun_learns_the_one_process_schedule(tmp_path: Path) -> None:
    """2 outer steps of every data-parallel estimator: the same hypergradients and schedule."""
    estimators = ("forward", "truncated_reverse", "greedy")
    sweep = tmp_path / "sweep"
    proc = torchrun(
        ["-m", *QUICK, f"estimator={','.join(estimators)}", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results, plots and config") == 3  # rank 0 prints, rank 1 not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # rank 1 wrote nothing
    for job, name in enumerate(estimators):
        got = json.loads((sweep / str(job) / "results.json").read_text())
        want = metahpo.run(metahpo.compose([*QUICK, f"estimator={name}"]))
        assert (got["estimator"], got["world_size"], want["world_size"]) == (name, 2, 1)
        steps = [h for h in got["history"] if h["hypergradient"] is not None]
        assert len(steps) == 2
        for g, w in zip(got["history"], want["history"], strict=True):
            assert g["meta_loss"] == pytest.approx(w["meta_loss"], rel=RTOL)
            for n, hg in (w["hypergradient"] or {}).items():
                assert rel_err(g["hypergradient"][n], hg) <= RTOL, (name, n)
        for n, sched in want["learned_schedule"].items():
            assert rel_err(got["learned_schedule"][n]["values"], sched["values"]) <= RTOL
        assert any(v != 0 for v in got["learned_schedule"]["lr"]["values"])


# -- a rank that dies -------------------------------------------------------------------------
DYING = [*QUICK, "outer.steps=3", "estimator._target_=tests.dying.DyingForward"]
BOUND = 120  # seconds: a correctness bound (no hang), not a timing benchmark


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_rank_stops_the_other_with_a_clear_error(tmp_path: Path, how: str) -> None:
    """Without torchrun's agent (as on another node): the survivor's own collective fails."""
    port = free_port()
    args = [*DYING, f"+estimator.how={how}", "distributed.timeout=10"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "metahpo", *args, f"hydra.run.dir={tmp_path}/run{r}"],
            cwd=tmp_path, env={**os.environ, **rank_env(r, port), "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]  # fmt: skip
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=BOUND)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert time.monotonic() - start < BOUND
    assert procs[0].returncode == 1, err[-2000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("metahpo: error")]
    assert line.startswith("metahpo: error: rank 0 of 2: a collective failed (another rank died")
    if how == "exit":
        assert procs[1].returncode == 3


def test_torchrun_stops_every_rank_when_one_dies(tmp_path: Path) -> None:
    """torchrun's agent ends the survivor (which may first report its failed collective)."""
    start = time.monotonic()
    proc = torchrun([*DYING, f"hydra.run.dir={tmp_path}/run"], tmp_path, timeout=BOUND)
    assert time.monotonic() - start < BOUND
    assert proc.returncode != 0
    # torchrun's report names the rank that died and its exit code
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: 3", proc.stderr)
    assert not (tmp_path / "run" / "results.json").exists()


def test_torchrun_continues_its_run_directory_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 resumes from its run directory's checkpoint; rank 1 must continue from it too."""
    run = tmp_path / "run"
    for steps in (1, 2):  # one outer step, then the run again in the same directory: two
        proc = torchrun([*QUICK, f"outer.steps={steps}", f"hydra.run.dir={run}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((run / "results.json").read_text())
    for steps in (1, 2):  # the same in one process
        want = metahpo.run(metahpo.compose([*QUICK, f"outer.steps={steps}"]), tmp_path / "one")
    assert [h["outer_step"] for h in got["history"]] == [h["outer_step"] for h in want["history"]]
    assert got["outer_steps"] == 2
    for g, w in zip(got["history"], want["history"], strict=True):
        assert g["meta_loss"] == pytest.approx(w["meta_loss"], rel=RTOL)
    for n, sched in want["learned_schedule"].items():
        assert rel_err(got["learned_schedule"][n]["values"], sched["values"]) <= RTOL
