"""The recipe's `profile` section: torch.profiler traces of a few updates per rank in `<run_dir>/profile/`, named
after the rank and the updates, which `launcher report` lists; bad values refused before anything is written;
nothing held or done per update when the section is absent."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import finish, run_cli, start_ranks

from launcher import profiling
from launcher.recipe import ProfileConfig
from launcher.report import report

TIMEOUT = 180


def profiled_steps(trace: Path) -> list[str]:
    """The `ProfilerStep#N` spans a Chrome-trace file holds, in order."""
    events = json.loads(trace.read_text())["traceEvents"]
    assert isinstance(events, list) and events
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def test_a_profiled_run_records_its_window_and_the_report_names_the_file(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", str(tiny_recipe), f"run_dir={run_dir}", "train.max_steps=8",
        "profile={start_step: 3, steps: 2, warmup: 1, memory: true}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trace = run_dir / "profile" / "rank0.steps_3-4.pt.trace.json"
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == [trace.name]  # no temporary file left
    assert profiled_steps(trace) == ["ProfilerStep#3", "ProfilerStep#4"]  # numbered as logged; warm-up not kept

    _, text, (record,) = report([run_dir])
    assert record["profile"] == [str(trace)]
    assert f"profile       {trace.name} in {run_dir / 'profile'}/" in text
    assert "https://ui.perfetto.dev" in text


def test_two_processes_each_write_their_own_trace(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    args = ("train", str(tiny_recipe), f"run_dir={run_dir}", "train.max_steps=6", "profile={ranks: all}")
    results = finish(start_ranks(2, *args, cwd=tmp_path), TIMEOUT)
    assert [code for code, _, _ in results] == [0, 0], results
    names = sorted(p.name for p in (run_dir / "profile").iterdir())
    assert names == ["rank0.steps_5-6.pt.trace.json", "rank1.steps_5-6.pt.trace.json"]  # cut at the run's end
    for name in names:
        assert profiled_steps(run_dir / "profile" / name) == ["ProfilerStep#5", "ProfilerStep#6"]


def test_bad_profile_values_are_refused_one_line_each_before_anything_is_written(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    bad = "profile={start_step: 0, steps: 0, warmup: -1, ranks: [0, -1, 1]}"
    proc = run_cli("train", str(tiny_recipe), f"run_dir={run_dir}", bad, cwd=tmp_path)
    assert proc.returncode == 2
    where = f"error: {tiny_recipe}: profile"
    assert proc.stderr.splitlines() == [
        f"{where}.start_step: must be >= 1, got 0",
        f"{where}.steps: must be >= 1, got 0",
        f"{where}.warmup: must be >= 0, got -1",
        f"{where}.ranks: a rank is an integer >= 0, got -1",
        f"{where}.ranks: 1 is not among the ranks of this launch (1 process: rank 0); give ranks below the number "
        "of processes, or all",
    ]
    for override, line in [
        ("profile.ranks=al", ".ranks: expected a list of integers or all, got a string ('al')"),
        ("profile={start_step: 2, warmup: 2}", ".warmup: the warm-up runs the updates just before "
         "profile.start_step, so it must be less than start_step (2), got 2"),
    ]:  # fmt: skip
        proc = run_cli("train", str(tiny_recipe), f"run_dir={run_dir}", override, cwd=tmp_path)
        assert (proc.returncode, proc.stderr) == (2, where + line + "\n")
    assert not run_dir.exists()


def rank(index: int) -> SimpleNamespace:
    """What `profiling.make` asks of the Accelerator."""
    return SimpleNamespace(process_index=index, is_main_process=index == 0, device=torch.device("cpu"))


def test_without_the_section_the_loop_holds_no_profiler():
    said: list[str] = []
    assert profiling.make(None, rank(0), "run", 0, 100, said.append) is None  # the loop's one check per update
    assert profiling.make(ProfileConfig(ranks=(1,)), rank(0), "run", 0, 100, said.append) is None
    assert said == []


def test_the_window_follows_the_attempt_and_the_run():
    config = ProfileConfig(start_step=5, steps=3, warmup=2)
    assert profiling.window(config, 0, 100) == profiling.Window(3, 5, 7)
    assert profiling.window(config, 3, 100) == profiling.Window(4, 5, 7)  # resumed in the warm-up: a shorter one
    assert profiling.window(config, 0, 6) == profiling.Window(3, 5, 6)  # the run ends inside the window
    assert profiling.window(config, 5, 100) == (
        "this attempt starts at update 6, past profile.start_step (5): nothing is profiled"
    )
    ends = "the run ends at update 4, before profile.start_step (5): nothing is profiled"
    assert profiling.window(config, 0, 4) == ends
    actions = [profiling.Window(3, 5, 7).action(n).name for n in range(2, 9)]
    assert actions == ["NONE", "WARMUP", "WARMUP", "RECORD", "RECORD", "RECORD_AND_SAVE", "NONE"]

    said: list[str] = []  # a resumed attempt past the window: said once, by the main process only
    assert profiling.make(config, rank(1), "run", 9, 100, said.append) is None
    assert profiling.make(config, rank(0), "run", 9, 100, said.append) is None
    assert said == ["note: profile: this attempt starts at update 10, past profile.start_step (5): nothing is profiled"]


def test_an_error_inside_the_window_still_writes_what_was_recorded(tmp_path: Path):
    said: list[str] = []
    config = ProfileConfig(start_step=1, steps=5, warmup=0)
    profiler = profiling.make(config, rank(0), str(tmp_path), 0, 10, said.append)
    assert profiler is not None
    try:
        for done in range(1, 4):
            torch.ones(4).sum()
            if done == 3:
                raise RuntimeError("an update failed")
            profiler.step(done)
    except RuntimeError:
        pass
    finally:
        profiler.close()
    profiler.close()  # closing again does nothing
    trace = tmp_path / "profile" / "rank0.steps_1-2.pt.trace.json"
    assert profiled_steps(trace) == ["ProfilerStep#1", "ProfilerStep#2", "ProfilerStep#3"]  # 3: as far as it went
    assert said == []


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_on_cuda_memory_history_is_recorded_over_the_recorded_updates(tmp_path: Path, monkeypatch):
    """The CUDA memory snapshot's calls, in order, with torch.cuda.memory's two functions stood in for (no GPU
    needed: the profiler takes the CUDA activity on a machine without one)."""
    calls: list[tuple[str, int]] = []
    done = 0
    monkeypatch.setattr(
        torch.cuda.memory, "_record_memory_history", lambda enabled="all", **_: calls.append((str(enabled), done))
    )
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: Path(path).write_bytes(pickle.dumps(done)))
    cuda = SimpleNamespace(process_index=0, is_main_process=True, device=torch.device("cuda"))
    config = ProfileConfig(start_step=2, steps=2, warmup=1, memory=True)
    profiler = profiling.make(config, cuda, str(tmp_path), 0, 10, print)
    assert profiler is not None
    for done in range(1, 6):
        torch.ones(4).sum()
        profiler.step(done)
    profiler.close()
    assert calls == [("all", 1), ("None", 3)]  # on before update 2, off after update 3
    folder = tmp_path / "profile"
    assert pickle.loads((folder / "rank0.steps_2-3.memory.pickle").read_bytes()) == 3  # dumped after update 3
    assert profiled_steps(folder / "rank0.steps_2-3.pt.trace.json") == ["ProfilerStep#2", "ProfilerStep#3"]


def test_the_report_names_memory_snapshots(tmp_path: Path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "rank0.steps_5-7.pt.trace.json").write_text('{"traceEvents": []}')
    (tmp_path / "profile" / "rank0.steps_5-7.memory.pickle").write_bytes(pickle.dumps({}))
    (tmp_path / "profile" / ".tmp-rank1.steps_5-7.pt.trace.json").write_text("")  # a write cut short: not named
    _, text, _ = report([tmp_path])
    assert "rank0.steps_5-7.pt.trace.json, rank0.steps_5-7.memory.pickle in" in text
    assert "https://pytorch.org/memory_viz" in text
