"""Sweeps (`launcher slurm sweep`) without a cluster: the values and combinations, the names and the array spec, the
refusals (one line, exit 2, nothing written), a task's job script run with stand-ins (its combination, and its
requeue as <array job>_<index>), and `slurm status` / `report` of a sweep dir made by hand. The real array, with a
task requeued and resumed, is in test_slurm.py."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_in_process

from launcher import sweep, sweep_report
from launcher.errors import RecipeError
from launcher.recipe import dump, load_recipe

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
SWEPT = ("optimizer.lr=1e-4,3e-4,1e-3", "train.batch_size=16,32")


def test_values_split_at_commas_outside_brackets_and_quotes():
    assert sweep.split_values("1e-4,3e-4") == ["1e-4", "3e-4"]
    assert sweep.split_values("[64,64],[128]") == ["[64,64]", "[128]"]
    assert sweep.split_values("{a: 1, b: 2},'x,y'") == ["{a: 1, b: 2}", "'x,y'"]
    assert sweep.split_values("adam") == ["adam"]


def test_overrides_are_fixed_or_swept_and_combine_first_axis_slowest():
    fixed, axes = sweep.parse(["train.max_steps=10", *SWEPT, "model.hidden_sizes=[8,8]", "~early_stopping"])
    assert fixed == ["train.max_steps=10", "model.hidden_sizes=[8,8]", "~early_stopping"]
    assert axes == [sweep.Axis("optimizer.lr", ("1e-4", "3e-4", "1e-3")), sweep.Axis("train.batch_size", ("16", "32"))]
    combos = sweep.combinations(axes)
    assert len(combos) == 6
    assert combos[:3] == [
        {"optimizer.lr": "1e-4", "train.batch_size": "16"},
        {"optimizer.lr": "1e-4", "train.batch_size": "32"},
        {"optimizer.lr": "3e-4", "train.batch_size": "16"},
    ]
    assert sweep.as_overrides(combos[5]) == ["optimizer.lr=1e-3", "train.batch_size=32"]


def test_task_names_sort_in_order_and_stay_short_and_safe():
    combo = {"optimizer.lr": "1e-4", "train.batch_size": "16"}
    assert sweep.task_name(3, 4, combo) == "3-lr=1e-4-batch_size=16"
    assert sweep.task_name(3, 12, combo) == "03-lr=1e-4-batch_size=16"
    # Two keys ending alike keep their full names; a path's slashes and spaces become _.
    both = {"optimizer.lr": "1", "scheduler.lr": "2", "data.path": "/a b/c"}
    assert sweep.task_name(0, 2, both) == "0-optimizer.lr=1-scheduler.lr=2-path=_a_b_c"
    assert len(sweep.task_name(0, 2, {"a": "x" * 200})) == 2 + sweep.NAME_CHARS


def test_array_spec():
    assert sweep.array_spec(range(6), None) == "0-5"
    assert sweep.array_spec(range(6), 2) == "0-5%2"
    assert sweep.array_spec([1, 3, 4, 5, 9], 3) == "1,3-5,9%3"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["optimizer.lr=1e-4", "optimizer.lr=3e-4,1e-3"], "optimizer.lr: given twice; give each key once"),
        (["optimizer.lr=1e-4,,3e-4"], "optimizer.lr: an empty value in the list '1e-4,,3e-4'"),
        (["optimizer.lr=1e-4,"], "optimizer.lr: an empty value in the list '1e-4,'"),
        (["optimizer.lr=1e-4,1e-4"], "optimizer.lr: the value '1e-4' is given twice"),
        (["optimizer.lr=1e-4"], "a sweep needs at least two combinations, got 1"),
        (["slurm.nodes=1,2"], "slurm.nodes: the tasks of a sweep share one job array and its resources"),
        (["run_dir=x", "optimizer.lr=1,2"], "run_dir: set by the sweep for each task"),
        ([*SWEPT, "--max-parallel", "0"], "--max-parallel: must be >= 1, got 0"),
        ([*SWEPT, "--time", "1h"], "--time: expected HH:MM:SS, MM:SS, MM or D-HH:MM:SS, got '1h'"),
        # A bad value fails every combination it is in: said once, for the first task it is in.
        (
            ["optimizer.lr=1e-4,abc", "train.batch_size=16,32"],
            f"task 2 (optimizer.lr=abc train.batch_size=16): {QUICKSTART}: optimizer.lr: must be a number > 0",
        ),
        (["optimizer.lr=1e-4,3e-4", "train.batch_size=16,0"], "task 1 (optimizer.lr=1e-4 train.batch_size=0): "),
    ],
)
def test_a_bad_sweep_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args: list[str], line: str):
    code, out, err = cli_in_process(["slurm", "sweep", QUICKSTART, *args], tmp_path)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {line}"), lines
    assert list(tmp_path.iterdir()) == []


def test_more_combinations_than_the_array_may_have_is_refused():
    assert sweep.count_problems(1001, 1001, None) == []
    assert sweep.count_problems(1002, 1001, None) == [
        "1002 combinations: more than the 1001 tasks a job array may have (MaxArraySize)"
    ]


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _stand_ins(bin_dir: Path, sbatch_job: str = "41") -> None:
    """sbatch (answers a job id), scontrol and squeue that log their calls, srun that runs its command once."""
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", f"#!/bin/bash\necho {sbatch_job}\n")
    _executable(
        bin_dir / "scontrol",
        '#!/bin/bash\ncase "$1 $2" in\n  "show hostnames") echo n1 ;;\n  "show node") echo "NodeAddr=10.0.0.1" ;;\n'
        '  "show config") echo "MaxArraySize            = 1001" ;;\n  *) echo "scontrol $*" >> "$FAKE_LOG" ;;\nesac\n',
    )
    _executable(bin_dir / "squeue", '#!/bin/bash\necho "squeue $*" >> "$FAKE_LOG"\n')
    _executable(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 "$@"\n')


def test_a_task_runs_its_combination_and_requeues_itself_by_array_job_and_index(tmp_path: Path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    _stand_ins(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code, out, err = cli_in_process(["slurm", "sweep", QUICKSTART, *SWEPT, "--max-parallel", "2"], tmp_path)
    assert code == 0, err
    assert out.startswith("submitted job array 41 (0-5%2): 6 task(s) of quickstart")
    sweep_dir = tmp_path / "runs" / "quickstart-sweep"
    found = json.loads((sweep_dir / "sweep.json").read_text())
    assert found["jobs"] == [{"job": "41", "array": "0-5%2"}]
    task = found["tasks"][3]
    assert task["overrides"] == {"optimizer.lr": "3e-4", "train.batch_size": "32"}
    assert task["run_dir"] == str(sweep_dir / "3-lr=3e-4-batch_size=32")
    submitted = json.loads((Path(task["run_dir"]) / "slurm" / "attempts.jsonl").read_text())
    assert submitted["event"] == "submit" and submitted["job"] == "41_3"
    script = (sweep_dir / "slurm" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5%2\n" in script and f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out\n" in script

    # Task 3 of array 41 (its own job id 57): its combination and run dir; stopped by a stop file, it requeues 41_3.
    _executable(
        bin_dir / "python",
        f'#!/bin/bash\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\necho "train $*" >> "$FAKE_LOG"\n'
        f'echo \'{{"stop_reason": "stop file"}}\' > "{task["run_dir"]}/last_run.json"\n',
    )
    script = re.sub(r"^PYTHON=.*$", f"PYTHON={bin_dir / 'python'}", script, flags=re.M)
    env = {**os.environ, "FAKE_LOG": str(log), "SLURM_JOB_ID": "57", "SLURM_ARRAY_JOB_ID": "41",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1"}  # fmt: skip
    ran = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    calls = log.read_text().splitlines()
    train = next(c for c in calls if c.startswith("train "))
    assert f"optimizer.lr=3e-4 train.batch_size=32 run_dir={task['run_dir']} resume=auto" in train
    assert "scontrol requeue 41_3" in calls, calls
    events = [
        json.loads(line)
        for line in (Path(task["run_dir"]) / "slurm" / "attempts.jsonl").read_text().split("\n")
        if line
    ]
    assert [(e["event"], e["job"]) for e in events] == [("submit", "41_3"), ("start", "41_3"), ("requeue", "41_3")]

    # The same sweep again: refused, unless resumed; resumed, only the tasks that have not ended are submitted.
    code, _, err = cli_in_process(["slurm", "sweep", QUICKSTART, *SWEPT], tmp_path)
    assert code == 2 and err.startswith(f"error: {sweep_dir}: holds a sweep already")
    for t in found["tasks"][:2]:
        Path(t["run_dir"], "last_run.json").write_text('{"stop_reason": "done"}')
    code, _, err = cli_in_process(["slurm", "sweep", QUICKSTART, "optimizer.lr=1e-4,3e-4", "--resume"], tmp_path)
    assert code == 2 and "--resume: not the combinations of the sweep" in err
    code, out, err = cli_in_process(["slurm", "sweep", QUICKSTART, *SWEPT, "--resume"], tmp_path)
    assert code == 0, err
    assert out.startswith("submitted job array 41 (2-5): 4 task(s)")
    assert len(json.loads((sweep_dir / "sweep.json").read_text())["jobs"]) == 2


RESOLVED = dump(load_recipe(QUICKSTART, ["train.max_steps=30"]))


def _run(run_dir: Path, accuracies: list[float], stop_reason: str | None) -> None:
    """A run dir as a run leaves it: recipe, metrics (val/accuracy every 10 steps), how it ended."""
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(RESOLVED)  # the quickstart's: checkpoint.monitor val/accuracy, max
    rows = [{"step": 10 * (i + 1), "time": float(i), "val/accuracy": a} for i, a in enumerate(accuracies)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if stop_reason:
        (run_dir / "last_run.json").write_text(json.dumps({"stop_reason": stop_reason, "step": 30, "total_steps": 30}))
    (run_dir / "slurm" / "attempts.jsonl").write_text('{"event": "submit", "job": "41_0"}\n')


def test_report_ranks_the_runs_by_the_best_monitored_value_unfinished_ones_last(tmp_path: Path):
    sweep_dir = tmp_path / "s"
    combos = [{"optimizer.lr": v} for v in ("1", "2", "3", "4")]
    tasks = [{"index": i, "overrides": c, "run_dir": str(sweep_dir / f"{i}")} for i, c in enumerate(combos)]
    _run(sweep_dir / "0", [0.5, 0.7, 0.6], "done")
    _run(sweep_dir / "1", [0.5, 0.9], None)  # the best value, but still running: after the finished ones
    _run(sweep_dir / "2", [0.8, 0.75, 0.8], "early stopping")
    axes = [sweep.Axis("optimizer.lr", ("1", "2", "3", "4"))]
    req = sweep.Request(QUICKSTART, (), {})
    sweep.record(sweep_dir, req, [], axes, tasks, {"job": "41", "array": "0-3"})

    runs, text, records, plotted = sweep_report.report([sweep_dir])
    assert [r["task"] for r in records["runs"]] == [2, 0, 1, 3] and records["monitor"] == "val/accuracy"
    assert [r["best"] for r in records["runs"][:2]] == [{"step": 10, "value": 0.8}, {"step": 20, "value": 0.7}]
    assert len(runs) == 3 and plotted == ["val/accuracy"]
    lines = text.splitlines()
    assert lines[0] == f"sweep {sweep_dir}: 4 run(s) ranked by the best val/accuracy (higher is better)"
    assert lines[2].split() == [
        "rank",
        "task",
        "lr",
        "best",
        "val/accuracy",
        "at",
        "step",
        "steps",
        "ended",
        "requeues",
    ]
    assert lines[3].split() == ["1", "2", "3", "0.8", "10", "30/30", "early", "stopping", "0"]
    assert lines[5].split()[:4] == ["3", "1", "2", "0.9"] and lines[5].split()[-3:] == ["not", "ended", "0"]
    assert lines[6].split() == ["4", "3", "4", "-", "-", "-", "not", "started", "0"]
    assert f"best: task 2 (optimizer.lr=3), val/accuracy 0.8: {sweep_dir / '2'}" in text

    with pytest.raises(RecipeError, match="a sweep dir; report it alone"):
        sweep_report.report([sweep_dir, sweep_dir / "0"])


def test_status_has_a_line_per_task(tmp_path: Path, monkeypatch):
    sweep_dir = tmp_path / "s"
    tasks = [{"index": i, "overrides": {"optimizer.lr": str(i)}, "run_dir": str(sweep_dir / f"{i}")} for i in (0, 1)]
    _run(sweep_dir / "0", [0.5, 0.7, 0.6], "done")
    sweep.record(sweep_dir, sweep.Request(QUICKSTART, (), {}), [], [], tasks, {"job": "41", "array": "0-1"})
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue: "not in the queue"
    code, out, err = cli_in_process(["slurm", "status", str(sweep_dir)], tmp_path)
    assert code == 0, err
    assert out.splitlines() == [
        f"sweep {sweep_dir}: 2 task(s); job array(s) 41 (0-1)",
        "task 0 (optimizer.lr=0): job 41_0 (not in the queue): 0 attempt(s), 0 requeue(s); step 30/30, done; "
        "val/accuracy 0.6",
        "task 1 (optimizer.lr=1): not submitted",
    ]
    # The queue as `squeue -r -j 41` lists an array's tasks, asked once for the array, not once per task.
    squeue = (
        '#!/bin/bash\necho "$*" >> "$0.log"\nprintf \'41_0|PENDING|JobArrayTaskLimit|N/A\\n41_1|PENDING|None|N/A\\n\'\n'
    )
    _executable(tmp_path / "squeue", squeue)
    code, out, err = cli_in_process(["slurm", "status", str(sweep_dir)], tmp_path)
    assert "task 0 (optimizer.lr=0): job 41_0 (PENDING, reason JobArrayTaskLimit): 0 attempt(s)" in out, out
    assert (tmp_path / "squeue.log").read_text() == "-h --states=all -r -j 41 -o %i|%T|%r|%S\n"


def test_the_monitored_metric():
    assert sweep.monitor({}) == ("val/loss", "min")
    assert sweep.monitor({"checkpoint": {"monitor": "val/loss", "mode": "min"}}) == ("val/loss", "min")
    stop = {"monitor": "val/accuracy", "mode": "max"}
    assert sweep.monitor({"checkpoint": {"monitor": "val/loss"}, "early_stopping": stop}) == ("val/accuracy", "max")
    kept = {"monitor": "val/loss", "mode": "min", "keep_best": 1}
    assert sweep.monitor({"checkpoint": kept, "early_stopping": stop}) == ("val/loss", "min")


def test_a_sweep_sbatch_refuses_leaves_no_sweep_dir_behind(tmp_path: Path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(
        bin_dir / "sbatch",
        "#!/bin/bash\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\nexit 1\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = cli_in_process(["slurm", "sweep", QUICKSTART, *SWEPT], work)
    assert code == 2 and err.startswith("error: sbatch: refused") and len(err.strip().splitlines()) == 1, err
    assert list(work.iterdir()) == [work / "runs"] and list((work / "runs").iterdir()) == []


def test_each_task_checkpoints_in_a_folder_of_its_own_under_the_recipes_checkpoint_dir(tmp_path: Path):
    store = ("checkpoint.dir=s3://ckpts/lr-sweep",)  # or a folder: every task would otherwise share it
    code, out, err = cli_in_process(["slurm", "sweep", QUICKSTART, *store, *SWEPT, "--dry-run"], tmp_path)
    assert code == 0, err
    assert "run_dir=" in out and "checkpoint.dir=s3://ckpts/lr-sweep/3-lr=3e-4-batch_size=32" in out
    assert not (tmp_path / "runs").exists()
