"""Checkpoint decisions and files, without training: retention, completeness, atomic replacement."""

from __future__ import annotations

from pathlib import Path

from launcher import checkpoint


def test_retention_keeps_the_newest():
    assert checkpoint.to_delete([100, 300, 200, 400], keep_last=2) == [100, 200]
    assert checkpoint.to_delete([100], keep_last=3) == []
    assert checkpoint.to_delete([], keep_last=1) == []


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
    checkpoint._replace_dir(new, target)
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
