"""Checks of values a type cannot express: ranges, combinations of sections, components that would not import or
build, missing files and, optionally, what this machine cannot do. Each problem is `key.path: message`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from launcher import components, folders, losses, strategies
from launcher.data import DataFacts
from launcher.extensions import build_lock_watch
from launcher.layout import BEST, LATEST
from launcher.recipe import component_checks, data_checks
from launcher.recipe.schema import (
    BUILT_IN_TRACKERS,
    TRACKERS,
    LoggingConfig,
    ProfileConfig,
    Recipe,
    SlurmConfig,
    TrainConfig,
)
from launcher.slurm_time import MAX_SIGNAL_TIME_S, TIME_FORMATS, parse_time

MAX_WORKERS = 256  # DataLoader worker processes per training process; each holds a copy of the dataset
MAX_TIMEOUT_S = 1e9  # about 30 years: Python's timedelta, which carries the timeout, ends a little further


def check_values(
    recipe: Recipe,
    check_files: bool = True,
    this_machine: bool = True,
    read_resume: bool = True,
    build: bool = True,
    build_data: bool = False,
) -> list[str]:
    """Problems a type cannot express: ranges, combinations, components that do not import or would not build,
    missing files, and (with `this_machine`) what this machine cannot do. Each is `key.path: message`.

    What needs the data opened (a Hugging Face set imports `transformers` and `datasets`), the model built or the
    optimizer stepped is checked last, and only where the components' arguments and files are right (and with
    `build`: False where the recipe is refused already), so that such a refusal comes in a second or two, not after
    them. A tokenized set is read from its files' start only; with `build_data` (`launcher train`, once nothing else
    is wrong) it is built into the cache that then serves the run, which tells what only its whole file can."""
    components_found = _check_components(recipe, check_files, this_machine)
    store_found = _check_store(recipe.checkpoint_store)  # a store is tried only where its URL is right
    problems = [
        *_check_train(recipe.train),
        *_check_stream(recipe),
        *(_check_machine(recipe) if this_machine else []),
        *_check_strategy(recipe),
        *components_found,
        *_check_evaluation(recipe),
        *_check_logging(recipe.logging, check_files),
        *_check_resume(recipe.resume, check_files and read_resume),
        *store_found,
        *(_check_folders(recipe) if check_files and this_machine and not store_found else []),
        *(_check_profile(recipe.profile, this_machine) if recipe.profile is not None else []),
        *_check_slurm(recipe.slurm),
    ]
    if build and not components_found:
        problems += _check_built(recipe, check_files, this_machine)
    if build_data and not problems and _built_later(recipe.data.train, recipe.data.val):
        problems += _check_splits(recipe, check_files, this_machine, stage="build")[0]
    return problems


def _check_stream(recipe: Recipe) -> list[str]:
    """A streamed train set has no length: no epochs, so the run is bounded by `train.max_steps` alone."""
    if recipe.data.train.kwargs.get("streaming") is not True or recipe.train.max_epochs is None:
        return []
    return [
        "train.max_epochs: a streamed train set (data.train.streaming: true) has no length, so no epochs: bound "
        "the run with train.max_steps instead"
    ]


def _check_train(t: TrainConfig) -> list[str]:
    problems = []
    if t.max_steps is None and t.max_epochs is None:
        problems.append("train: give train.max_steps or train.max_epochs")
    problems += _at_least(
        ("train.max_steps", t.max_steps, 1),
        ("train.max_epochs", t.max_epochs, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps, 1),
        ("train.activation_checkpointing.every", t.activation_checkpointing.every, 0),
    )
    if not t.compile.backend:
        problems.append("train.compile.backend: expected a torch.compile backend name (e.g. inductor), got ''")
    elif t.compile.enabled:
        problems += _backend_problems(t.compile.backend)
    if not 0 <= t.seed < components.SEED_LIMIT:
        problems.append(f"train.seed: must be in [0, 2**32) (numpy takes 32-bit seeds), got {t.seed}")
    if t.max_time_s is not None and not t.max_time_s > 0:
        problems.append(f"train.max_time_s: must be > 0, got {t.max_time_s}")
    if t.peak_flops is not None and not t.peak_flops > 0:
        problems.append(f"train.peak_flops: must be > 0 (FLOP/s of one device), or null; got {t.peak_flops}")
    if t.clip_grad_norm is not None and not t.clip_grad_norm > 0:
        problems.append(f"train.clip_grad_norm: must be > 0, or null for no clipping; got {t.clip_grad_norm}")
    return problems


def _backend_problems(name: str) -> list[str]:
    """torch.compile looks its backend up only at the first update, after the run dir is written: asked here."""
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    try:
        lookup_backend(name)
    except Exception:  # dynamo's InvalidBackend, or a registered backend that fails to import
        return [
            f"train.compile.backend: unknown torch.compile backend {name!r}; expected one of: "
            f"{', '.join(list_backends())}"
        ]
    return []


def deprecations(recipe: Recipe) -> list[str]:
    """Notes on keys that still work but have a successor."""
    if recipe.strategy.fsdp.activation_checkpointing:
        return [
            "note: strategy.fsdp.activation_checkpointing is deprecated (it still works): use "
            "train.activation_checkpointing: full, which works with every strategy"
        ]
    return []


def _at_least(*checks: tuple[str, int | None, int]) -> list[str]:
    return [f"{key}: must be >= {low}, got {value}" for key, value, low in checks if value is not None and value < low]


def _check_machine(recipe: Recipe) -> list[str]:
    """What this machine cannot do (the same checks run again where the run starts: loop.preflight)."""
    if recipe.train.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            return ["train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU"]
    return []


def _check_components(recipe: Recipe, check_files: bool, this_machine: bool) -> list[str]:
    d = recipe.data
    problems = _at_least(("data.num_workers", d.num_workers, 0))
    if d.num_workers > MAX_WORKERS:
        problems.append(f"data.num_workers: must be <= {MAX_WORKERS} (processes per trainer), got {d.num_workers}")
    problems += _check_splits(recipe, check_files, this_machine, stage="args")[0]
    problems += component_checks.check_model_args(recipe)
    problems += component_checks.check_loss(recipe)
    problems += component_checks.check_optimizer(recipe.optimizer, component_checks.built_in_model(recipe), trial=False)
    problems += component_checks.check_scheduler(recipe.scheduler)
    return problems


def _check_built(recipe: Recipe, check_files: bool, this_machine: bool) -> list[str]:
    """What the data says once opened (its length, what it tells the model), the model built with it, and the
    optimizer built and stepped once."""
    problems, facts = _check_splits(recipe, check_files, this_machine, stage="open")
    problems += component_checks.check_model(recipe, facts, this_machine)
    # The trial optimizer (seconds: torch.optim's first use) may build a C++ extension (DeepSpeed's CPU Adam): a
    # stale build lock must not hang here.
    with build_lock_watch(recipe.strategy.timeout_s):
        return problems + component_checks.check_optimizer(recipe.optimizer, component_checks.built_in_model(recipe))


def _built_later(*specs: components.Component | None) -> bool:
    """Whether a split is a set `check_split` opens from its files' start (`peek`) unless told to build it."""
    built_in = [components.resolve("data", s.target) for s in specs if s is not None]
    return any(components.is_built_in(fn) and hasattr(fn, "peek") for fn in built_in)


def _check_splits(
    recipe: Recipe, check_files: bool, this_machine: bool, stage: str
) -> tuple[list[str], DataFacts | None]:
    """The train and val sets' problems at `stage` (see `check_split`; a val problem the train set said already,
    once; a train set without a batch for every process), and what is known of the train set."""
    d = recipe.data
    found, facts = data_checks.check_split("data.train", d.train, check_files, this_machine, stage)
    problems = list(found)
    if d.val is not None:
        val_found = data_checks.check_split("data.val", d.val, check_files, this_machine, stage)[0]
        problems += data_checks.new_val_problems(d.train, d.val, found, val_found)
    if facts is not None and facts.samples is not None:
        processes = data_checks.launched_processes() if this_machine else 1
        problems += data_checks.check_batches(recipe, facts.samples, processes)
    return problems, facts


def _check_evaluation(recipe: Recipe) -> list[str]:
    """Evaluation, and what watches its metrics: early stopping and the best checkpoints."""
    e, c, es = recipe.eval, recipe.checkpoint, recipe.early_stopping
    problems = _at_least(
        ("eval.every_steps", e.every_steps, 1),
        ("eval.max_batches", e.max_batches, 1),
        ("eval.batch_size", e.batch_size, 1),
        ("checkpoint.keep_last", c.keep_last, 1),
        ("checkpoint.every_steps", c.every_steps, 1),
        ("checkpoint.keep_best", c.keep_best, 0),
    )
    evaluates = recipe.data.val is not None and (e.every_steps is not None or e.every_epoch)
    metrics = with_perplexity(losses.evaluation_metrics(recipe.loss), language_model(recipe))
    if es is not None:
        problems += _at_least(("early_stopping.patience", es.patience, 0))
        if not es.min_delta >= 0:
            problems.append(f"early_stopping.min_delta: must be >= 0, got {es.min_delta}")
        problems += _monitor_problems("early_stopping.monitor", es.monitor, metrics)
        if not evaluates:
            problems.append(
                "early_stopping: needs evaluation: set data.val and eval.every_steps or eval.every_epoch, "
                "or early_stopping=null"
            )
    if c.keep_best:
        problems += _monitor_problems("checkpoint.monitor", c.monitor, metrics)
        if not evaluates:
            problems.append("checkpoint.keep_best: needs evaluation: set data.val and eval.every_steps or every_epoch")
    return problems


def language_model(recipe: Recipe) -> bool | None:
    """Whether the run trains on token sequences (its evaluation then gives val/perplexity with cross-entropy),
    from its built-in data or model; None where neither is built in."""
    data, model = recipe.data.train.short_name, recipe.model.short_name
    for name, sequences, others in (
        (data, components.SEQUENCE_DATASETS, components.DATASETS),
        (model, components.LANGUAGE_MODELS, components.MODELS),
    ):
        if name in others:
            return name in sequences
    return None


def with_perplexity(metrics: tuple[str, ...] | None, sequences: bool | None) -> tuple[str, ...] | None:
    """The metrics of a cross-entropy evaluation (val/accuracy among them) with val/perplexity where the run is a
    language model's; not known (None) where that is not known."""
    if metrics is None or "val/accuracy" not in metrics or sequences is False:
        return metrics
    return (*metrics, "val/perplexity") if sequences else None


def _monitor_problems(key: str, name: str, metrics: tuple[str, ...] | None) -> list[str]:
    """A monitored metric the evaluation will produce: the line training would give at its first evaluation.
    `metrics` None: not known before training (a loss built by a function), so any validation metric goes."""
    if metrics is None:
        if name.startswith("val/"):
            return []
        return [f"{key}: expected a validation metric such as val/loss, val/accuracy or val/perplexity, got {name!r}"]
    if name not in metrics:
        return [f"{key}: {name!r} is not a validation metric of this run (it has: {', '.join(sorted(metrics))})"]
    return []


def _check_logging(lg: LoggingConfig, check_files: bool) -> list[str]:
    problems = _at_least(("logging.every_steps", lg.every_steps, 1))
    for name in lg.trackers:
        if name not in TRACKERS:
            problems.append(f"logging.trackers: unknown tracker {name!r}; expected some of: {', '.join(TRACKERS)}")
        elif check_files and name not in BUILT_IN_TRACKERS and importlib.util.find_spec(name) is None:
            problems.append(
                f"logging.trackers: {name} is not installed here (pip install {name.replace('_', '-')}), "
                "or leave it out of the list"
            )
        elif check_files and name == "mlflow":
            problems += _mlflow_problems()
    return problems


def _mlflow_problems() -> list[str]:
    """MLflow refuses a tracking or model-registry URI it has no store for (`sqlite:` without SQLAlchemy) only
    when the run starts: asked here, without making the store (which would create its files)."""
    try:
        import mlflow
        from mlflow.tracking._model_registry.utils import _get_store_registry
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:  # another MLflow than the one these checks know: it speaks for itself at the start
        return []
    for what, uri, stores in (
        ("tracking", mlflow.get_tracking_uri(), _tracking_store_registry),
        ("model registry", mlflow.get_registry_uri(), _get_store_registry()),
    ):
        try:
            stores.get_store_builder(uri)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return [
                f"logging.trackers: MLflow cannot use its {what} URI {uri!r} ({reason.split(';')[0]}); set "
                "MLFLOW_TRACKING_URI, e.g. to file:./mlruns, or leave mlflow out of the list"
            ]
    return []


def _check_profile(pr: ProfileConfig, this_machine: bool) -> list[str]:
    """The profiled window's bounds, and ranks this launch has (with `this_machine`: the launch is this one)."""
    problems = _at_least(
        ("profile.start_step", pr.start_step, 1), ("profile.steps", pr.steps, 1), ("profile.warmup", pr.warmup, 0)
    )
    if pr.start_step >= 1 and pr.warmup >= pr.start_step:
        problems.append(
            f"profile.warmup: the warm-up runs the updates just before profile.start_step, so it must be less than "
            f"start_step ({pr.start_step}), got {pr.warmup}"
        )
    if pr.ranks == "all":
        return problems
    if not pr.ranks:
        problems.append("profile.ranks: empty; give the ranks to trace, e.g. [0], or all")
    problems += [f"profile.ranks: a rank is an integer >= 0, got {r}" for r in pr.ranks if r < 0]
    processes = data_checks.launched_processes() if this_machine else None
    outside = sorted({r for r in pr.ranks if processes is not None and r >= processes})
    if outside:
        have = "1 process: rank 0" if processes == 1 else f"{processes} processes: ranks 0 to {processes - 1}"
        problems.append(
            f"profile.ranks: {', '.join(map(str, outside))} {'is' if len(outside) == 1 else 'are'} not among the "
            f"ranks of this launch ({have}); "
            "give ranks below the number of processes, or all"
        )
    return problems


def _check_resume(resume: str, read: bool) -> list[str]:
    """A checkpoint to resume from, named by its path: there and (`read`) complete and intact, as the run's start
    checks it."""
    by_name = Path(resume).name in (LATEST, BEST) and Path(resume).parent.is_dir()
    if resume in ("none", "auto"):
        return []
    if not (Path(resume).is_dir() or by_name):
        return [
            f"resume: expected none, auto, a checkpoint directory or <checkpoints>/latest|best; {resume!r} is not "
            "a directory"
        ]
    from launcher import checkpoint

    problem = checkpoint.resume_problem(Path(resume)) if read else None
    return [f"resume: {problem}"] if problem else []


def _check_folders(recipe: Recipe) -> list[str]:
    """The run dir and the checkpoints' folder (or storage prefix) can be made and written here."""
    found = [folders.problem("run_dir", Path(recipe.run_dir))]
    if recipe.checkpoint_store:
        from launcher.storage import probe

        problem = probe(recipe.checkpoint_store)
        found.append(problem and f"checkpoint.dir: {problem}")
    elif not recipe.checkpoint_dir.is_relative_to(recipe.run_dir):
        found.append(folders.problem("checkpoint.dir", recipe.checkpoint_dir))
    return [p for p in found if p]


def _check_store(url: str | None) -> list[str]:
    """A storage URL as written: no credentials in it, a protocol whose package is installed."""
    if url is None:
        return []
    from launcher.storage import url_problem

    problem = url_problem("checkpoint.dir", url)
    return [problem] if problem else []


def _check_strategy(recipe: Recipe) -> list[str]:
    s = recipe.strategy
    problems = []
    if not 0 < s.timeout_s <= MAX_TIMEOUT_S:
        problems.append(f"strategy.timeout_s: must be > 0 and at most {MAX_TIMEOUT_S:g} seconds, got {s.timeout_s}")
    return problems + strategies.recipe_problems(recipe)


def _check_slurm(sl: SlurmConfig) -> list[str]:
    """The job's settings, checked wherever the recipe is, so that a job is not refused (or its script garbled)
    only once submitted; `launcher slurm submit` checks its flags on top (launcher/slurm.py)."""
    problems = _at_least(
        ("slurm.nodes", sl.nodes, 1),
        ("slurm.gpus_per_node", sl.gpus_per_node, 0),
        ("slurm.max_requeues", sl.max_requeues, 0),
        ("slurm.max_restarts", sl.max_restarts, 0),
        ("slurm.signal_before_s", sl.signal_before_s, 0),
        ("slurm.stop_before_end_s", sl.stop_before_end_s, 0),
    )
    try:
        parse_time(sl.time)
    except ValueError:
        problems.append(f"slurm.time: expected {TIME_FORMATS}, got {sl.time!r}")
    if sl.signal_before_s > MAX_SIGNAL_TIME_S:
        problems.append(
            f"slurm.signal_before_s: must be <= {MAX_SIGNAL_TIME_S} (SLURM's limit), got {sl.signal_before_s}"
        )
    for option in sl.sbatch:
        if not option.startswith("-") or "\n" in option:
            problems.append(f"slurm.sbatch: expected sbatch options such as --qos=high, one per item; got {option!r}")
    for key, value in (("slurm.partition", sl.partition), ("slurm.account", sl.account)):
        if value is not None and "\n" in value:  # it would end its #SBATCH line and start a line of its own
            problems.append(f"{key}: expected a name on one line, or null; got {value!r}")
    return problems
