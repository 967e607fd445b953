"""Checkpoints: atomic, complete-only resume, exact continuation, EMA, SIGTERM; manifests with sizes
and SHA-256 that a resume verifies (falling back past damaged checkpoints); nothing non-finite saved."""

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import brightness_reward, tiny_generator

from branchgrpo.config import ConfigError
from branchgrpo.train.checkpoint import (
    MARKER, TrainerState, complete_checkpoints, find_resume, save_checkpoint, verify_checkpoint,
)
from branchgrpo.train.weights import NonFiniteWeightsError
from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer

COMMON = [
    "run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0", "run.device=cpu",
    "data.prompts_per_iteration=2", "eval.samples_per_prompt=1", "eval.every=0", "tree.steps=5",
    "split_plan=0:2,2:2", "run.checkpoint_every=2", "run.keep_checkpoints=2", "run.ema_decay=0.9",
    "update.learning_rate=1e-3", "update.clip_range=0.2",
]


def trainer(out, *overrides):
    config = load_train_config(None, "branchgrpo", [f"run.output_dir={out}", *COMMON, *overrides])
    return Trainer(config, model=tiny_generator(), reward=brightness_reward)


def train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows if "reward_mean" in r}


def measured_rows(out):
    """Every metrics row (train and eval, in file order) without the load-dependent columns."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/", "throughput/"))} for r in rows]


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    trainer(straight, "run.iterations=6").run()
    stopped = tmp_path / "stopped"
    first = trainer(stopped, "run.iterations=4").run()
    assert first.iterations == 4
    resumed = trainer(stopped, "run.iterations=6", "run.resume=auto").run()
    assert resumed.iterations == 6
    a, b = train_rows(straight), train_rows(stopped)
    assert sorted(a) == sorted(b) == list(range(6))
    for it in (4, 5):
        for key in ("reward_mean", "loss", "ratio_mean", "grad_norm", "advantage_abs_mean"):
            assert abs(a[it][key] - b[it][key]) <= 1e-6 * (1 + abs(a[it][key])), (it, key, a[it][key], b[it][key])
    for name in ("model.safetensors", "ema.safetensors"):
        wa = load_file(str(straight / "weights" / name))
        wb = load_file(str(stopped / "weights" / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


def test_only_complete_checkpoints_are_resumed_and_old_ones_pruned(tmp_path):
    out = tmp_path / "run"
    trainer(out, "run.iterations=6").run()
    root = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["iter_000004", "iter_000006"]  # keep 2
    # a crash while writing leaves a temporary folder or an unmarked one: never picked
    (root / ".tmp-iter_000008-123").mkdir()
    (root / "iter_000010").mkdir()
    (root / "iter_000010" / "model.safetensors").write_bytes(b"truncated")
    assert find_resume(root, "auto").name == "iter_000006"
    assert not (root / "iter_000010" / MARKER).exists()
    # the next start removes what interrupted writes left behind
    (out / "weights" / ".model.safetensors.abc123.tmp").write_bytes(b"half")
    trainer(out, "run.iterations=6", "run.resume=auto").run()
    assert not (root / ".tmp-iter_000008-123").exists()
    assert not (out / "weights" / ".model.safetensors.abc123.tmp").exists()
    assert (root / "iter_000010").is_dir()  # not a temporary name: left alone (and never resumed)


def test_sigterm_finishes_the_iteration_writes_a_checkpoint_and_returns(tmp_path):
    out = tmp_path / "run"
    job = trainer(out, "run.iterations=50", "run.checkpoint_every=0")
    original_step = job.step

    def step_then_signal():
        metrics = original_step()
        if job.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    job.step = step_then_signal
    summary = job.run()
    assert summary.stopped_by_signal == "SIGTERM"
    assert summary.iterations == 3
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["iter_000003"]
    resumed = trainer(out, "run.iterations=5", "run.resume=auto", "run.checkpoint_every=0").run()
    assert resumed.iterations == 5 and resumed.stopped_by_signal is None
    assert sorted(train_rows(out)) == [0, 1, 2, 3, 4]


def test_ema_follows_the_closed_form(tmp_path):
    job = trainer(tmp_path, "run.iterations=1")
    start = {k: v.detach().float().clone() for k, v in job.model.trainable.state_dict().items()}
    job.step()
    now = job.model.trainable.state_dict()
    for key in start:
        torch.testing.assert_close(job.ema[key], 0.9 * start[key] + 0.1 * now[key].float())


@pytest.fixture(scope="module")
def six_iterations(tmp_path_factory):
    """An uninterrupted six-iteration run (checkpoints at 4 and 6)."""
    out = tmp_path_factory.mktemp("six") / "run"
    trainer(out, "run.iterations=6").run()
    return out


def test_the_manifest_records_every_files_size_and_sha256(six_iterations):
    for checkpoint in complete_checkpoints(six_iterations / "checkpoints"):
        manifest = json.loads((checkpoint / MARKER).read_text())
        files = sorted(p.name for p in checkpoint.iterdir() if p.name != MARKER)
        assert sorted(manifest["files"]) == files == [
            "ema.safetensors", "model.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json"]
        for name, entry in manifest["files"].items():
            data = (checkpoint / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert verify_checkpoint(checkpoint) == []


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": (lambda c: _flip_byte(c / "model.safetensors"), "model.safetensors does not match its SHA-256"),
    "truncated": (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]),
                  "optimizer.pt has 100 bytes, the manifest says"),
    "missing": (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors is missing"),
    "garbage marker": (lambda c: (c / MARKER).write_text("{not json"), "marker cannot be read"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_the_damage(six_iterations, tmp_path, damage):
    checkpoint = tmp_path / "iter_000006"
    shutil.copytree(six_iterations / "checkpoints" / "iter_000006", checkpoint)
    apply, message = DAMAGE[damage]
    apply(checkpoint)
    problems = verify_checkpoint(checkpoint)
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(ConfigError, match="is damaged"):
        find_resume(tmp_path, str(checkpoint))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_resume_still_equals_the_uninterrupted_run(
        six_iterations, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(six_iterations, out)
    _flip_byte(out / "checkpoints" / "iter_000006" / "model.safetensors")
    resumed = trainer(out, "run.iterations=6", "run.resume=auto").run()  # goes back to 4 and trains 4, 5 again
    assert resumed.iterations == 6
    err = capsys.readouterr().err
    assert "iter_000006 is damaged (model.safetensors does not match its SHA-256)" in err
    assert "resuming from iter_000004" in err
    root = out / "checkpoints"
    assert (root / "damaged-iter_000006").is_dir()
    assert [p.name for p in complete_checkpoints(root)] == ["iter_000004", "iter_000006"]
    assert verify_checkpoint(root / "iter_000006") == []
    assert measured_rows(out) == measured_rows(six_iterations)  # no duplicate or missing rows
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(six_iterations / "weights" / name)), load_file(str(out / "weights" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical


def test_a_diverging_update_stops_the_run_naming_it_and_checkpoints_nothing_non_finite(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteWeightsError) as caught:
        trainer(out, "run.iterations=3", "run.checkpoint_every=1", "update.learning_rate=1e30").run()
    message = str(caught.value)
    assert message.startswith("the update of iteration 0 made the weights non-finite")
    assert "learning_rate=1e+30" in message and "reward" not in message
    assert not (out / "checkpoints").exists() and not (out / "weights").exists()


@pytest.mark.parametrize("poisoned", ["model", "ema", "optimizer"])
def test_save_checkpoint_refuses_non_finite_tensors_before_writing(tmp_path, poisoned):
    good = {"w": torch.ones(3)}
    bad = {"w": torch.tensor([1.0, float("inf"), 0.0])}
    optimizer = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": bad["w"] if poisoned == "optimizer" else good["w"]}},
                 "param_groups": []}
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to write checkpoint iter_000003: 1 of \d .*NaN/Inf"):
        save_checkpoint(tmp_path, TrainerState(3, 0), bad if poisoned == "model" else good, optimizer,
                        ema=bad if poisoned == "ema" else good)
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(tmp_path, TrainerState(3, 0), good, {"state": {}, "param_groups": []}, ema=good)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["iter_000003"]
