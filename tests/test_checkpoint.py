"""Checkpoint decisions and files, without training: retention, completeness, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

from launcher import checkpoint


def test_retention_keeps_the_newest_and_the_best():
    assert checkpoint.to_delete([100, 300, 200, 400], keep_last=2) == [100, 200]
    assert checkpoint.to_delete([100], keep_last=3) == []
    assert checkpoint.to_delete([], keep_last=1) == []
    assert checkpoint.to_delete([100, 200, 300, 400], keep_last=1, best=[[200, 0.1], [100, 0.2]]) == [300]
    assert checkpoint.to_delete([300, 400], keep_last=1, best=[[200, 0.1]]) == [300]  # 200 is gone already


def test_ranking_the_best_checkpoints():
    best = checkpoint.rank_best([], 10, 0.5, keep_best=2, mode="min")
    best = checkpoint.rank_best(best, 20, 0.3, keep_best=2, mode="min")
    best = checkpoint.rank_best(best, 30, 0.4, keep_best=2, mode="min")
    assert best == [[20, 0.3], [30, 0.4]]
    assert checkpoint.rank_best(best, 40, 0.4, keep_best=2, mode="min") == [[20, 0.3], [30, 0.4]]  # ties: older
    assert checkpoint.rank_best(best, 40, float("nan"), keep_best=2, mode="min") == best
    assert checkpoint.rank_best([[1, 0.9]], 2, 0.95, keep_best=1, mode="max") == [[2, 0.95]]


def test_latest_and_best_are_looked_up_not_linked(tmp_path: Path):
    for step, value, mode in ((10, 0.5, "max"), (20, 0.9, "max"), (30, None, "max")):
        d = tmp_path / checkpoint.step_dir_name(step)
        d.mkdir()
        monitor = {"name": "val/accuracy", "mode": mode, "value": value}
        (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "monitor": monitor}))
    assert checkpoint.resolve(tmp_path / "latest") == tmp_path / "step_00000030"
    assert checkpoint.resolve(tmp_path / "best") == tmp_path / "step_00000020"
    assert checkpoint.resolve(tmp_path / "step_00000010") == tmp_path / "step_00000010"
    assert not (tmp_path / "latest").exists() and not (tmp_path / "best").exists()


def test_only_complete_step_directories_count(tmp_path: Path):
    for name in ("step_00000010", "step_00000020", ".tmp-step_00000030", "best", "step_x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.STATE_FILE).write_text("{}")
    (tmp_path / "step_00000040").mkdir()  # a crash before its state file was written: incomplete
    assert checkpoint.complete_steps(tmp_path) == [10, 20]
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000020"
    assert checkpoint.latest(tmp_path / "missing") is None


def test_replacing_a_directory_never_leaves_neither(tmp_path: Path):
    target = tmp_path / "best"
    target.mkdir()
    (target / "v").write_text("old")
    new = tmp_path / ".tmp-best"
    new.mkdir()
    (new / "v").write_text("new")
    checkpoint.replace_dir(new, target)
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
