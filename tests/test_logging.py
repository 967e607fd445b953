"""metrics.jsonl is strict JSON whatever the metrics hold: non-finite floats are written as null and
named in the row's ``nonfinite_keys``; finite values round-trip exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from branchgrpo.train.logging import MetricsLogger, metrics_line


def strict_loads(line: str):
    """``json.loads`` that rejects NaN/Infinity/-Infinity, as RFC 8259 and most JSON readers do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


def test_strict_parser_rejects_what_python_json_writes_by_default():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"reward_std": float("nan")}))  # what MetricsLogger used to write


def test_every_line_is_strict_json(tmp_path):
    # the values a run can produce: reward_std of scores near the float32 limit overflows to NaN
    overflowing = torch.tensor([3e38, -3e38, 3e38, -3e38])
    rows = [
        {"iteration": 0, "reward_mean": 0.25, "reward_std": float(overflowing.std()), "loss": 1e-310},
        {"iteration": 1, "reward_mean": float("inf"), "reward_std": -math.inf, "grad_norm": np.float32("nan"),
         "components": {"hps": float("nan"), "clip": 0.5}, "per_depth": [1.0, float("inf")],
         "processes": 1, "tag": "x", "flag": True},
        {"iteration": 2, "reward_mean": torch.tensor(float("nan")), "reward_std": np.float64(2.5),
         "count": np.int64(3)},
    ]
    assert not math.isfinite(rows[0]["reward_std"])  # the case from the issue: float32 std of ±3e38 overflows
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False)
    for row in rows:
        logger.log(row)
    logger.log_eval(2, float("nan"))
    logger.log_eval(3, 0.75)
    logger.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    parsed = [strict_loads(line) for line in lines]  # raises on any NaN/Infinity
    assert len(parsed) == 5
    assert parsed[0] == {"iteration": 0, "reward_mean": 0.25, "reward_std": None, "loss": 1e-310,
                         "nonfinite_keys": ["reward_std"]}
    assert parsed[1] == {
        "iteration": 1, "reward_mean": None, "reward_std": None, "grad_norm": None,
        "components": {"hps": None, "clip": 0.5}, "per_depth": [1.0, None], "processes": 1, "tag": "x", "flag": True,
        "nonfinite_keys": ["reward_mean", "reward_std", "grad_norm", "components.hps", "per_depth[1]"],
    }
    assert parsed[2] == {"iteration": 2, "reward_mean": None, "reward_std": 2.5, "count": 3,
                         "nonfinite_keys": ["reward_mean"]}
    assert parsed[3] == {"iteration": 2, "eval_reward": None, "nonfinite_keys": ["eval_reward"]}
    assert parsed[4] == {"iteration": 3, "eval_reward": 0.75}  # no key when all is finite


def test_finite_values_round_trip_exactly():
    values = [0.1, -1e-300, 3.4028234663852886e38, 1.7976931348623157e308, 5e-324, 123456789.123456789]
    row = {"iteration": 7, **{f"v{i}": v for i, v in enumerate(values)}}
    assert strict_loads(metrics_line(row)) == row


def test_anything_else_is_an_error_not_a_silent_line():
    with pytest.raises(TypeError):
        metrics_line({"iteration": 0, "weights": torch.zeros(3)})  # not a scalar: refused, nothing written
