"""The run dir as a run writes it: the resolved recipe and environment, the history of attempts, the metrics
(rolled back to the checkpoint a resumed run starts from) and the trackers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import filter_trackers

from launcher.layout import (
    ENV_FILE,
    HISTORY_FILE,
    LAST_RUN_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    ROLLED_BACK_FILE,
    read_jsonl,
)
from launcher.metrics import JsonlWriter, environment, flat_hparams
from launcher.recipe import Recipe, dump
from launcher.strategies import DDP
from launcher.tracker_runs import store_ids, stored_ids
from launcher.trackers import backfill, run_ids, trackers


class RunDir:
    """What the run writes into its run dir; files by the main process alone, trackers by Accelerate."""

    def __init__(self, accelerator: Accelerator, recipe: Recipe):
        self.accelerator = accelerator
        self.recipe = recipe
        self.path = Path(recipe.run_dir)
        self.jsonl: JsonlWriter | None = None
        self.opened = False
        self.noted: dict[str, Any] = {}  # what `note` was told before `open`: written with the environment

    def open(self, strategy: DDP, step: int, resume_from: Path | None, restart: int = 0) -> None:
        """Write the run's recipe and environment and the attempt's start, and start logging at `step`. Every
        rank calls this after all passed their checks (the barrier), so nothing is written for a refused run.
        `restart`: the elastic agent's count; a restarted attempt continues the run, from its start where it
        found no checkpoint."""
        continued = resume_from is not None or restart > 0
        accelerator, recipe, t = self.accelerator, self.recipe, self.recipe.train
        accelerator.wait_for_everyone()
        self.opened = True
        if accelerator.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / RECIPE_FILE).write_text(dump(recipe))
            env = environment(
                accelerator.num_processes, str(accelerator.distributed_type), t.mixed_precision, str(accelerator.device)
            )
            env.update(strategy=strategy.name, **strategy.layout())
            env.update(self.noted)
            (self.path / ENV_FILE).write_text(json.dumps(env, indent=2))
            resumed_from = recipe.checkpoint_name(resume_from) if resume_from else None
            restarted = {"restart": restart} if restart else {}
            record(self.path, "start", step=step, resumed_from=resumed_from, world_size=accelerator.num_processes,
                   **restarted)  # fmt: skip
            if "jsonl" in recipe.logging.trackers:
                if continued:
                    roll_back_metrics(self.path, step)
                self.jsonl = JsonlWriter(self.path / METRICS_FILE)
        self.start_trackers(step, continued)

    def start_trackers(self, step: int, continued: bool) -> None:
        """Start the trackers (only now may they create their files: TensorBoard's event file is made as its
        writer is). An attempt that continues the run continues its W&B and MLflow runs, which get the rows of
        `metrics.jsonl` they lack up to `step`; the main process stores the runs' ids for the attempts after."""
        accelerator, recipe = self.accelerator, self.recipe
        ids = stored_ids(self.path) if continued and accelerator.is_main_process else {}
        project = recipe.name or "launcher"  # the wandb project and MLflow experiment; the run dir's name, the run's
        chosen = trackers(recipe.logging.trackers, self.path, project, step if continued else None, ids)
        accelerator.log_with = filter_trackers(chosen, str(self.path))
        accelerator.init_trackers(project, config=flat_hparams(recipe.to_dict()))
        if not accelerator.is_main_process:
            return
        if continued:
            backfill(accelerator.trackers, read_jsonl(self.path / METRICS_FILE), step)
        now = {**ids, **run_ids(accelerator.trackers)}  # a tracker left out of this attempt keeps its run's id
        if now != ids:
            store_ids(self.path, now)

    def note(self, values: dict[str, Any]) -> None:
        """Add what the run learns once it runs (the FLOPs of an update) to `env.json`; before the run dir is
        opened (a resumed run knows them from its checkpoint), kept until it is."""
        if not self.opened:
            self.noted.update(values)
        elif self.accelerator.is_main_process:
            path = self.path / ENV_FILE
            path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.jsonl is not None:
            self.jsonl.write(step, values)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()

    def finish(self, outcome: dict[str, Any]) -> None:
        """How this attempt ended, for whatever runs it next (the SLURM job script requeues a stopped run)."""
        if self.accelerator.is_main_process:
            (self.path / LAST_RUN_FILE).write_text(json.dumps(outcome) + "\n")
            record(self.path, "end", step=outcome["step"], stop_reason=outcome["stop_reason"])


def record(run_dir: Path, event: str, **values: Any) -> None:
    """A line in the run's history: when an attempt started (and from which checkpoint) or ended, and how."""
    with (run_dir / HISTORY_FILE).open("a") as f:
        f.write(json.dumps({"event": event, "time": round(time.time(), 3), **values}) + "\n")


def roll_back_metrics(run_dir: Path, step: int) -> None:
    """Make `metrics.jsonl` end at `step`, where a resumed run picks up: rows a crashed attempt logged after its
    last checkpoint are moved to `metrics.rolled_back.jsonl`, so the run's curve has one value per step and
    nothing on disk is lost."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            after = json.loads(line)["step"] > step
        except (ValueError, KeyError, TypeError):
            after = True  # a line cut short by the crash
        (drop if after else keep).append(line)
    if drop:
        with (run_dir / ROLLED_BACK_FILE).open("a") as f:
            f.writelines(drop)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
