"""The sharing study (docs/results.md, claim 1): its statistics and its command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import metahpo
from metahpo.build import build
from metahpo.core import ConfigError
from metahpo.sharing import main, per_step_hypergradients, sharing_statistics

TINY = ["task=quadratic", "horizon=12", "schedule.lr.segments=12", "progress=false"]


def test_statistics_match_the_bound_for_independent_noise_and_linear_drift() -> None:
    # m_t = eps t exactly (antithetic noise: every row has its negated twin), iid noise sigma
    gen = torch.Generator().manual_seed(0)
    eps, sigma, horizon = 0.01, 0.3, 60
    noise = sigma * torch.randn(2000, horizon, generator=gen, dtype=torch.float64)
    g = eps * torch.arange(horizon, dtype=torch.float64) + torch.cat([noise, -noise])
    stats = sharing_statistics(g, windows=[1, 3, 10, 30])
    assert stats["eps"] == pytest.approx(eps, rel=1e-9)
    for row in stats["windows"]:
        w = row["W"]
        assert row["bias2"] == pytest.approx(eps**2 * (w**2 - 1) / 12, rel=1e-9, abs=1e-15)
        assert row["variance"] == pytest.approx(stats["sigma2"] / w, rel=0.1)
        assert row["mse"] == pytest.approx(row["bound"], rel=0.1)
    assert stats["sigma2"] == pytest.approx(sigma**2, rel=0.05)


def test_per_step_hypergradients_are_the_estimator_s_for_each_batch_order() -> None:
    cfg = metahpo.compose([*TINY, "estimator=exact_reverse", "schedule.lr.init=0.1"])
    g = per_step_hypergradients(cfg, [0, 1, 2], progress=False)
    assert g.shape == (3, 12) and len({tuple(r.tolist()) for r in g}) == 3
    setup = build(cfg)
    other = setup.task.with_seed(2, keep_weights=True)
    assert torch.equal(g[2], setup.estimator.hypergradient(other, setup.schedule).grads["lr"])
    with pytest.raises(ConfigError, match="schedule.lr.segments=4 must equal the horizon"):
        per_step_hypergradients(metahpo.compose([*TINY, "schedule.lr.segments=4"]), [0, 1])


def test_the_command_writes_table_json_and_figure(tmp_path: Path) -> None:
    main(["--seeds", "3", "--out", str(tmp_path), *TINY, "schedule.lr.init=0.1"])
    data = json.loads((tmp_path / "sharing.json").read_text())
    assert data["seeds"] == 3 and [r["W"] for r in data["windows"]] == [1, 2, 3, 4, 6, 12]
    assert data["windows"][0]["variance"] == pytest.approx(data["sigma2"])
    assert "| 12 |" in (tmp_path / "sharing.md").read_text()
    assert (tmp_path / "sharing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
