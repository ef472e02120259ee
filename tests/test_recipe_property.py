"""Property: what `launcher validate` accepts, `launcher train` trains; what either refuses, it refuses cleanly.

Recipes are made by mutating a valid tiny recipe (hypothesis, derandomized: the same few hundred every run):
variations that keep it valid (one or none per group of keys, so they compose) and mutations that break it (wrong
types, numbers out of range, integers beyond 64 bits, floats for integers, unknown and misspelt keys, removed
required keys, bad component names and arguments, monitors the evaluation never produces, LBFGS, ...). Each
recipe is given as overrides on the tiny recipe's file and, composed, as a file of its own; for each:

- both forms get the same verdict from validate, with the same lines;
- validate accepts it if and only if it holds no breaking mutation, and a refusal names a key the mutation touched;
- train, with the same arguments, trains it (two updates) when validate accepted it, and otherwise refuses it with
  validate's lines;
- a refusal is exit 2, only `error: <recipe>: <key>: ...` lines, one per problem, no traceback, nothing written.

The CLI runs in this process (`launcher.cli.main`), some thousand calls in well under a minute; Accelerate's global
state is reset before each call. A handful of cases also run as real subprocesses, to show the two paths agree.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from launcher import cli
from launcher.recipe import apply_overrides, parse_yaml

TINY = """\
model: {_component_: mlp, hidden_sizes: [8]}
data:
  dataset: {_component_: synthetic_classification, num_features: 4, num_classes: 3, num_samples: 64}
  train: {split: train}
  val: {split: val, num_samples: 32}
optimizer: {_component_: adam, lr: 0.003}
train: {max_steps: 2, batch_size: 8, seed: 3}
eval: {every_steps: 1, every_epoch: false}
checkpoint: {keep_last: 1}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
"""
EXAMPLES = int(os.environ.get("LAUNCHER_PROPERTY_EXAMPLES", "200"))  # more, once in a while: =1500
CALL_TIMEOUT_S = 60  # one in-process call; they take hundredths of a second


def text(value: Any) -> str:
    """A value as override text (JSON is YAML; the YAML spellings of non-finite floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    return json.dumps(value)


@dataclass(frozen=True)
class Mutation:
    overrides: tuple[str, ...]
    keys: tuple[str, ...] = ()  # for a breaking mutation, the keys its refusal may name; none for a variation
    run_dir_holds: bool = False  # the run dir exists before the call, holding a file of the user's

    @property
    def breaks(self) -> bool:
        return bool(self.keys)


def ok(*overrides: str) -> Mutation:
    return Mutation(overrides)


def bad(keys: str | tuple[str, ...], *overrides: str) -> Mutation:
    return Mutation(overrides, (keys,) if isinstance(keys, str) else keys)


def sets(key: str, value: Any, keys: str | tuple[str, ...] | None = None) -> Mutation:
    return bad(keys or key, f"{key}={text(value)}")


# ---------------------------------------------------------------------------------------------------- variations

lrs = st.floats(1e-4, 0.1)
fractions = st.floats(0.0, 0.9)
seeds = st.integers(0, 2**32 - 1)


def cosine(warmup_and_floor: tuple[int, float]) -> Mutation:
    warmup, floor = warmup_and_floor
    return ok("scheduler._component_=cosine", f"scheduler.warmup_steps={warmup}", f"scheduler.min_ratio={floor}")


# Variations without a number to draw: each is also tried alone (below).
FIXED_VARIATIONS = {
    "schedule": [ok("scheduler._component_=onecycle", "scheduler.pct_start=0.5"), ok("scheduler=linear")],
    "train": [
        ok("train.max_epochs=1"),
        ok("train.mixed_precision=bf16"),
        ok("train.max_time_s=1e9", "train.max_nonfinite_steps=1"),
        ok("train.clip_grad_norm=null"),
        ok("train.clip_grad_norm=.inf"),
    ],
    "evaluation": [
        ok("data.val=null", "eval.every_steps=null"),
        ok("early_stopping.monitor=val/loss", "early_stopping.patience=0", "early_stopping.min_delta=0.01"),
        ok("early_stopping.monitor=val/accuracy", "early_stopping.mode=max"),
        ok("checkpoint.keep_best=1", "checkpoint.monitor=val/accuracy", "checkpoint.mode=max"),
        ok("~eval"),  # the defaults: evaluate at each epoch's end, and at the run's
        ok("eval.max_batches=1", "eval.batch_size=4", "data.val.split=test"),
    ],
    "misc": [
        ok("resume=auto"),
        Mutation((), run_dir_holds=True),
        ok("loss=torch.nn.functional.cross_entropy"),  # a loss function, not a module
        ok("loss._component_=torch.nn.functional.cross_entropy", "loss.label_smoothing=0.1"),
        # No accuracy without cross-entropy: what would monitor it is turned off (this group comes last).
        ok("loss=torch.nn.functional.nll_loss", "early_stopping=null", "checkpoint.keep_best=0"),
        ok("checkpoint.async_save=true"),
        ok("checkpoint.save_final=false"),
        ok("checkpoint.every_steps=1"),
        ok("~logging.every_steps", "strategy.timeout_s=60"),
        ok("strategy=null", "slurm=null"),  # null leaves a section unset: its defaults, as ~strategy
        ok("loss=cross_entropy"),
        ok("loss._component_=torch.nn.CrossEntropyLoss", "loss.label_smoothing=0.1"),
    ],
}

VARIATION_GROUPS = [  # at most one variation of each group: they touch different keys, so they compose
    st.sampled_from(["adamw", "sgd", "rmsprop", "adagrad", "torch.optim.Adam", "AdamW"]).flatmap(
        lambda name: lrs.map(lambda lr: ok(f"optimizer._component_={name}", f"optimizer.lr={lr}"))
    ),
    st.one_of(
        st.tuples(st.integers(0, 3), fractions).map(cosine),
        st.integers(1, 3).map(lambda n: ok("scheduler._component_=step", f"scheduler.step_size={n}")),
        st.sampled_from(FIXED_VARIATIONS["schedule"]),
    ),
    st.one_of(
        st.sampled_from([[], [4], [8, 4]]).map(lambda h: ok(f"model.hidden_sizes={text(h)}")),
        fractions.map(lambda p: ok(f"model.dropout={p}")),
        st.sampled_from(["relu", "tanh", "silu"]).map(lambda a: ok(f"model.activation={a}")),
        st.integers(3, 8).map(lambda n: ok(f"model.num_classes={n}", "model.in_features=4")),
    ),
    st.one_of(
        st.integers(1, 64).map(lambda b: ok(f"train.batch_size={b}")),
        st.integers(1, 64).map(lambda b: ok(f"train.batch_size={b}", "data.drop_last=true", "data.shuffle=false")),
        st.integers(1, 3).map(lambda n: ok(f"train.gradient_accumulation_steps={n}")),
    ),
    st.one_of(
        seeds.map(lambda n: ok(f"train.seed={n}")),
        seeds.map(lambda n: ok(f"data.dataset.seed={n}", "data.dataset.clusters_per_class=2")),
        st.sampled_from(FIXED_VARIATIONS["train"]),
    ),
    st.sampled_from(FIXED_VARIATIONS["evaluation"]),
    st.sampled_from(FIXED_VARIATIONS["misc"]),
]


@st.composite
def variations(draw: st.DrawFn) -> list[Mutation]:
    return [m for group in VARIATION_GROUPS if (m := draw(st.none() | group)) is not None]


# ---------------------------------------------------------------------------------------------------- mutations

INT_FIELDS = {  # integer fields and their lowest valid value
    "train.batch_size": 1,
    "train.max_steps": 1,
    "train.gradient_accumulation_steps": 1,
    "train.seed": 0,
    "train.max_nonfinite_steps": 1,
    "eval.every_steps": 1,
    "eval.max_batches": 1,
    "checkpoint.keep_last": 1,
    "checkpoint.keep_best": 0,
    "logging.every_steps": 1,
    "data.num_workers": 0,
    "early_stopping.patience": 0,
    "model.num_classes": 3,
    "data.dataset.num_samples": 1,
    "data.dataset.num_features": 1,
    "data.dataset.seed": 0,
}
HUGE = [2**63, 2**64 + 1, 10**30, -(2**63) - 1]
NOT_INTS = [2.0, 1e30, 0.5, math.nan, "abc", [1], {"a": 1}, True]


def int_field_breaks() -> st.SearchStrategy[Mutation]:
    fields = st.sampled_from(sorted(INT_FIELDS))
    return st.one_of(
        fields.map(lambda k: sets(k, INT_FIELDS[k] - 1)),
        st.tuples(fields, st.sampled_from(HUGE)).map(lambda a: sets(*a)),
        st.tuples(fields, st.sampled_from(NOT_INTS)).map(lambda a: sets(*a)),
        st.sampled_from(["train.seed", "data.dataset.seed"]).map(lambda k: sets(k, 2**32)),
        st.just(sets("data.num_workers", 10_000)),
    )


FLOAT_BREAKS = [
    ("train.clip_grad_norm", [0, -1.0, math.nan, "abc"]),
    ("train.max_time_s", [0, -5, math.nan]),
    ("strategy.timeout_s", [0, 1e300, math.inf, math.nan, 10**400]),
    ("early_stopping.min_delta", [-0.1, math.nan, 10**400]),
    ("optimizer.lr", [0, -1, 10**400, math.nan, "abc", [0.1]]),
    ("optimizer.weight_decay", [-1, math.inf]),
    ("optimizer.betas", [[0.9], [1.5, 0.9], "x"]),
    ("optimizer.eps", [10**30, -(10**30)]),
    ("model.dropout", [1.0, -0.1, 10**400, "x"]),
    ("data.dataset.noise", [math.nan, math.inf, "loud"]),
]

COMPONENT_BREAKS = [
    sets("model.hidden_sizes", [0]),
    sets("model.hidden_sizes", [-4, 8]),
    sets("model.hidden_sizes", [10**30]),
    sets("model.hidden_sizes", [2.0]),
    sets("model.hidden_sizes", "abc"),
    sets("model.hidden_sizes", [10**9, 10**9], "model"),  # fp32 parameters beyond any memory here
    sets("model.num_classes", 2),  # fewer than the data's 3
    sets("model.in_features", 5),  # not the data's 4
    sets("model.activation", "swish"),
    sets("model.hidden_size", [4]),
    sets("data.train.split", ""),
    sets("data.train.split", "tst"),
    sets("data.val.split", 5),
    sets("data.dataset.num_features", 10**12, ("data.train", "data.val", "model")),  # tensors beyond memory
    sets("data.train.num_samples", 10**13, "data.train"),
    sets("data.dataset.num_classes", 0),
    sets("data.dataset.clusters_per_class", 0),
    sets("data.train.nosuch", 1),
]

NAME_BREAKS = [
    sets("model._component_", "mlpp"),
    sets("model._component_", "nosuchpkg.Net"),
    sets("model._component_", "math.pi"),
    sets("model._component_", -1),
    sets("model._component_", ""),
    sets("model", "gpt", "model._component_"),  # a language model on feature vectors
    sets("model", 7),
    sets("optimizer._component_", "lbfgs"),
    sets("optimizer._component_", "adamx"),
    sets("optimizer._component_", "sparseadam", "optimizer"),
    sets("loss", "mse"),
    sets("loss", "bce_with_logits"),
    sets("loss", "nosuch"),
    sets("scheduler", "step", "scheduler.step_size"),
    bad("scheduler.warmup_steps", "scheduler._component_=onecycle", "scheduler.warmup_steps=5"),
    bad("scheduler.warmup_steps", "scheduler._component_=cosine", f"scheduler.warmup_steps={10**30}"),
    bad("scheduler.warmup_start", "scheduler._component_=cosine", "scheduler.warmup_start=first"),
    bad(
        "scheduler.warmup_start",
        "scheduler._component_=cyclic",
        "scheduler.step_size_up=4",
        "scheduler.warmup_start=zero",
    ),
    bad("scheduler.div_factor", "scheduler._component_=onecycle", "scheduler.div_factor=0"),
    bad("scheduler.min_ratio", "scheduler._component_=cosine", "scheduler.min_ratio=2"),
    bad("scheduler.min_ratio", "scheduler._component_=linear", f"scheduler.min_ratio={10**400}"),
    sets("train.mixed_precision", "fp8"),
    sets("strategy.name", "horovod"),
    sets("early_stopping.mode", "up"),
    sets("data.shuffle", "yes"),
    sets("logging.trackers", ["jsonl", "tensorbord"]),
]

KEY_BREAKS = [
    sets("train.batchsize", 8),
    sets("optimiser.lr", 0.1),
    sets("model._componnt_", "mlp"),
    sets("loss._target_", "torch.nn.CrossEntropyLoss"),
    sets("nosuch", 1),
    bad("model", "~model"),
    bad("optimizer", "~optimizer"),
    bad("data", "~data"),
    bad(("train.max_steps", "train.max_epochs"), "~train.max_steps"),
    bad(("data.dataset._component_", "data.train._component_"), "~data.dataset._component_"),
    bad("nosuch.key", "~nosuch.key"),
    bad("model", "model=null"),  # a required section cannot be left unset
    bad("optimizer", "optimizer=null"),
    bad("train", "train=5"),
    bad(("train.max_epochs",), "train.max_epochs=abc", "train.max_steps=null"),
]

MONITOR_BREAKS = [
    sets("early_stopping.monitor", "val/acc"),
    sets("early_stopping.monitor", "train/loss"),
    bad("checkpoint.monitor", "checkpoint.keep_best=1", "checkpoint.monitor=val/f1"),
    # NLLLoss takes class indices like cross entropy, but only a CrossEntropyLoss gets val/accuracy.
    bad("early_stopping.monitor", "loss=torch.nn.NLLLoss", "early_stopping.monitor=val/accuracy"),
    bad("early_stopping", "data.val=null", "early_stopping.patience=2"),
    bad("checkpoint.keep_best", "eval.every_steps=null", "eval.every_epoch=false", "checkpoint.keep_best=1"),
]

OTHER_BREAKS = [
    bad("data.drop_last", "data.drop_last=true", "train.batch_size=100"),  # no whole batch: a run without steps
]

# Placeholders for paths the test makes in its folder: an existing file, an empty folder, a token file whose size is
# not a whole number of tokens.
FILE, EMPTY, ODD = "{file}", "{empty}", "{odd}"

# What builds and then cannot train, or fails only where training would reach it (its first update, its first
# checkpoint, the trackers' start): validate must find each before anything is written.
BUILT_BREAKS = [
    sets("model._component_", "builtins.dict"),  # not a module
    sets("model._component_", "torch.nn.Module"),  # takes no arguments
    sets("model._component_", "torch.nn.Identity"),  # no parameters
    sets("model._component_", "json.loads"),
    sets("loss", "os.getcwd"),  # a function that makes no loss
    sets("loss", "json.dumps"),
    sets("train.blocks", "abc"),
    sets("train.blocks", ["Nope"]),
    sets("train.activation_checkpointing", "full"),  # an MLP declares no blocks
    bad(("strategy.fsdp",), "strategy.fsdp.wrap=[Nope]"),  # and the strategy is DDP
    bad("strategy.fsdp.wrap", "strategy.name=fsdp", "strategy.fsdp.wrap=[Nope]"),
    bad("train.compile", "train.compile={backend: nope_backend}"),
    bad("train.compile", "train.compile.enabled=true", "train.compile.backend=nope_backend"),
    sets("logging.trackers", ["jsonl", "mlflow"]),  # the test gives MLflow a URI it has no store for
    sets("resume", EMPTY),
    sets("resume", FILE),
    sets("run_dir", FILE),
    sets("run_dir", FILE + "/run"),
    sets("run_dir", "/proc/launcher-run"),
    sets("run_dir", os.devnull),
    sets("checkpoint.dir", FILE),
    sets("checkpoint.dir", "/proc/launcher-checkpoints"),
    bad(("data", "model"), f"data.dataset={{_component_: token_memmap, path: {ODD}, block_size: 4}}"),
    bad(("data", "model"), "data.dataset={_component_: char_text, path: /no/such/file.txt, block_size: 4}"),
    sets("slurm.time", "abc"),
    sets("slurm.nodes", -1),
    sets("slurm.max_requeues", -1),
    sets("slurm.sbatch", "--qos"),  # a string for a list
    sets("slurm.sbatch", "nan"),
]

DEEP = 3500  # nesting beyond Python's recursion limit
YAML_BREAKS = [
    bad("optimizer.lr", "optimizer.lr=!!float abc"),
    bad("train.max_steps", "train.max_steps=!!int x"),
    bad("train.max_steps", "train.max_steps=[1"),
    bad("extra", "extra=" + "[" * DEEP + "]" * DEEP),
    bad("model.hidden_sizes", "model.hidden_sizes=" + "[" * DEEP + "]" * DEEP),
    bad("extra", "extra=" + "{a: " * DEEP + "1" + "}" * DEEP),
    bad("optimizer", "optimizer={_component_: adam, lr: 0.003, 7: 1}"),  # a key that is not a string
    bad("optimizer", "optimizer={_component_: adam, lr: 0.003, [a, b]: 1}"),  # a key that is a list
    bad("train", "train={max_steps: 2, batch_size: 8, null: 1}"),
    bad("override 'nokey'", "nokey"),
    bad("override '=5'", "=5"),
    bad("override 'optimizer..lr=1'", "optimizer..lr=1"),
    bad("train.max_steps", "train.max_steps=2", "train.max_steps=3", "~train.max_steps", "train.max_steps.x=1"),
]

# Every key of the tiny recipe as written out (`--print-recipe`), each given a value of a kind it never takes.
LEAF_KEYS = [
    "name", "run_dir", "resume", "model._component_", "data.train._component_", "data.train.num_features",
    "data.train.num_classes", "data.train.num_samples", "data.train.split", "data.val.split", "data.num_workers",
    "data.shuffle", "data.drop_last", "loss", "optimizer._component_", "optimizer.lr", "scheduler._component_",
    "train.max_steps", "train.max_epochs", "train.batch_size", "train.gradient_accumulation_steps",
    "train.clip_grad_norm", "train.mixed_precision", "train.seed", "train.max_nonfinite_steps", "train.max_time_s",
    "train.compile", "train.activation_checkpointing", "train.blocks", "train.peak_flops", "train.chunked_loss",
    "eval.every_steps", "eval.every_epoch", "eval.max_batches", "eval.batch_size", "early_stopping",
    "checkpoint.every_steps", "checkpoint.save_final", "checkpoint.keep_last", "checkpoint.keep_best",
    "checkpoint.async_save", "checkpoint.monitor", "checkpoint.mode", "checkpoint.dir", "logging.every_steps",
    "logging.trackers", "logging.progress_bar", "strategy.name", "strategy.find_unused_parameters",
    "strategy.timeout_s", "strategy.fsdp.wrap", "strategy.fsdp.reshard_after_forward", "strategy.deepspeed.zero_stage",
    "strategy.deepspeed.config", "slurm.nodes", "slurm.gpus_per_node", "slurm.time", "slurm.partition",
    "slurm.account", "slurm.max_requeues", "slurm.max_restarts", "slurm.signal_before_s", "slurm.stop_before_end_s",
    "slurm.sbatch", "slurm.setup", "profile",
]  # fmt: skip
SECTIONS = (
    "data.dataset", "data.val", "data", "train", "train.compile", "eval", "checkpoint", "logging", "strategy",
    "strategy.fsdp", "strategy.deepspeed", "slurm", "early_stopping", "profile", "scheduler",
)  # fmt: skip
UNKNOWN_KEY_BREAKS = [sets(f"{section}.nosuch", 1, section) for section in SECTIONS] + [
    bad("optimizer.groups", "optimizer.groups=[{params: '*', nosuch: 1}]")
]
if not torch.cuda.is_available():
    OTHER_BREAKS.append(sets("train.mixed_precision", "fp16"))

FIXED_BREAKS = (
    COMPONENT_BREAKS + NAME_BREAKS + KEY_BREAKS + MONITOR_BREAKS + OTHER_BREAKS + BUILT_BREAKS + YAML_BREAKS
    + UNKNOWN_KEY_BREAKS
)  # fmt: skip


def wrong_kind_breaks() -> st.SearchStrategy[Mutation]:
    """A mapping where no key of the recipe takes one, a list where only `model.hidden_sizes` takes one."""
    keys = st.sampled_from(LEAF_KEYS)
    return st.one_of(
        keys.map(lambda k: sets(k, {"a": 1})),
        keys.filter(lambda k: k != "model.hidden_sizes").map(lambda k: sets(k, [1])),
    )


BREAKS = st.one_of(
    int_field_breaks(),
    wrong_kind_breaks(),
    st.sampled_from(FLOAT_BREAKS).flatmap(lambda kv: st.sampled_from(kv[1]).map(lambda v: sets(kv[0], v))),
    st.sampled_from(FIXED_BREAKS),
)


@st.composite
def cases(draw: st.DrawFn) -> list[Mutation]:
    """A few variations, then (about two times in three) one or two breaking mutations on top."""
    breaks = [0, 0, 1, 1, 1, 2][draw(st.integers(0, 5))]
    return draw(variations()) + [draw(BREAKS) for _ in range(breaks)]


# ---------------------------------------------------------------------------------------------------- running the CLI


@dataclass(frozen=True)
class Outcome:
    code: int | str  # the exit status, or the exception that escaped main()
    stdout: str
    stderr: str
    written: tuple[str, ...]  # what the call left in its (fresh, empty) working folder

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


@contextlib.contextmanager
def working_folder(root: Path) -> Iterator[Path]:
    here, folder = Path.cwd(), Path(tempfile.mkdtemp(dir=root))
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(here)


class Hung(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """A run that hangs (an epoch without batches loops forever) fails the test instead of stalling it."""

    def expire(signum: int, frame: Any) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def in_process(args: list[str], root: Path) -> Outcome:
    """`launcher ARGS` in this process, in a fresh working folder, with a fresh Accelerate."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
    # A run ends with gc.collect() (loop.run), which would scan every object of this process (torch's,
    # hypothesis's) each time: frozen, what exists before the run is left out, and a run takes hundredths of a second.
    gc.freeze()
    out, err = io.StringIO(), io.StringIO()
    with working_folder(root) as folder, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with time_limit(CALL_TIMEOUT_S):
                code: int | str = cli.main(args)
        except BaseException as e:  # any escape (SystemExit too) is what this test looks for
            code = f"{type(e).__name__}: {e}"
        finally:
            gc.unfreeze()
        written = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*")))
    return Outcome(code, out.getvalue(), err.getvalue(), written)


def in_subprocess(args: list[str], root: Path) -> Outcome:
    folder = Path(tempfile.mkdtemp(dir=root))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )
    written = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*")))
    return Outcome(proc.returncode, proc.stdout, proc.stderr, written)


# ---------------------------------------------------------------------------------------------------- the checks

LINE = re.compile(r"^error: (?P<source>[^:]+): (?P<key>[\w./~\[\]]+|override '[^']*'): \S")


def assert_refused_cleanly(outcome: Outcome, source: str) -> list[str]:
    """Exit 2, one `error: <source>: <key>: ...` line per problem, no traceback, nothing written; the keys."""
    shown = f"exit {outcome.code}\nstdout:\n{outcome.stdout}\nstderr:\n{outcome.stderr}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    assert outcome.code == 2, shown
    assert outcome.lines and len(set(outcome.lines)) == len(outcome.lines), shown
    keys = []
    for line in outcome.lines:
        match = LINE.match(line)
        assert match and match["source"] == source, f"not an error line naming {source} and a key: {line!r}\n{shown}"
        keys.append(match["key"])
    assert outcome.written == (), f"written: {outcome.written}\n{shown}"
    return keys


def related(key: str, expected: str) -> bool:
    """The same key, or one inside the other (`a.b` in `a`, `a[0].b` in `a`)."""
    return key == expected or key.startswith((expected + ".", expected + "[")) or expected.startswith(key + ".")


def assert_trained(outcome: Outcome, run_dir: Path) -> None:
    shown = f"exit {outcome.code}\nstdout:\n{outcome.stdout}\nstderr:\n{outcome.stderr}"
    assert outcome.code == 0 and "Traceback" not in outcome.stderr, shown
    assert re.search(r"(done|stopped \(.*\)) at step [12]/", outcome.stdout), shown
    assert (run_dir / "metrics.jsonl").is_file(), shown


@dataclass
class Case:
    root: Path
    base: Path
    mutations: list[Mutation]
    paths: dict[str, Path]  # what the placeholders (FILE, EMPTY, ODD) stand for

    def overrides(self, run_dir: Path) -> list[str]:
        """The run dir first: a mutation may name another."""
        given = [o for m in self.mutations for o in m.overrides]
        for placeholder, path in self.paths.items():
            given = [o.replace(placeholder, str(path)) for o in given]
        return [f"run_dir={run_dir}", *given]

    def composed_file(self, run_dir: Path) -> Path | None:
        """The recipe as one file of its own, beside the tiny one (None when the overrides do not apply)."""
        raw, problems = apply_overrides(parse_yaml(self.base.read_text()), self.overrides(run_dir), str(self.base))
        if problems:
            return None
        handle, name = tempfile.mkstemp(suffix=".yaml", dir=self.base.parent)
        with os.fdopen(handle, "w") as f:
            f.write(yaml.safe_dump(raw, sort_keys=False))
        return Path(name)


def contents(folder: Path) -> dict[str, bytes] | None:
    """What a folder holds, file by file (None: it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"/" for p in folder.rglob("*")}


STATS: Counter[str] = Counter()


def check(case: Case) -> None:
    run_dir = Path(tempfile.mkdtemp(dir=case.root)) / "run"
    if any(m.run_dir_holds for m in case.mutations):
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("the user's, kept whatever happens")
    args = [str(case.base), *case.overrides(run_dir)]
    before = {path: contents(path) for path in (run_dir, *case.paths.values())}
    validated = in_process(["validate", *args], case.root)
    assert {path: contents(path) for path in before} == before, f"validate wrote: {validated.stderr}"
    trained = in_process(["train", *args], case.root)
    breaking = [m for m in case.mutations if m.breaks]
    STATS["recipes"] += 1
    if validated.code == 0:
        assert_trained(trained, run_dir)
        assert not breaking, f"accepted (and trained), but {breaking} should break it"
        STATS["accepted and trained"] += 1
    else:
        assert breaking, f"a valid recipe refused:\n{validated.stderr}"
        keys = assert_refused_cleanly(validated, str(case.base))
        assert_refused_cleanly(trained, str(case.base))
        assert trained.lines == validated.lines, f"validate:\n{validated.stderr}\ntrain:\n{trained.stderr}"
        # A refused run leaves the run dir (and anything else it was pointed at) as it found it.
        assert {path: contents(path) for path in before} == before, f"train wrote: {trained.stderr}"
        if len(breaking) == 1:
            assert any(related(k, e) for k in keys for e in breaking[0].keys), (breaking, validated.stderr)
        STATS["refused"] += 1
    file = case.composed_file(run_dir)
    if file is not None:  # the same recipe written out gets the same verdict, with the same lines
        as_file = in_process(["validate", str(file)], case.root)
        assert as_file.code == validated.code, (as_file.stderr, validated.stderr)
        assert as_file.stderr.replace(str(file), "<recipe>") == validated.stderr.replace(str(case.base), "<recipe>")
        STATS["also as a file"] += 1


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(TINY)
    return path


def placeholder_paths(root: Path) -> dict[str, Path]:
    paths = {FILE: root / "a-file.txt", EMPTY: root / "an-empty-folder", ODD: root / "odd.bin"}
    paths[FILE].write_text("not a folder, not a recipe")
    paths[EMPTY].mkdir()
    paths[ODD].write_bytes(bytes(1001))  # 500.5 uint16 tokens
    return paths


def test_validate_accepts_exactly_what_trains(
    base: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    root = tmp_path_factory.mktemp("cases")
    paths = placeholder_paths(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch://tracking")  # a URI MLflow has no store for

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(cases())
    def property_holds(mutations: list[Mutation]) -> None:
        check(Case(root, base, mutations, paths))

    fixed = [m for group in FIXED_VARIATIONS.values() for m in group] + FIXED_BREAKS
    for mutation in fixed:  # each at least once, alone, whatever the generated cases draw
        property_holds = example([mutation])(property_holds)
    STATS.clear()
    property_holds()
    print(dict(STATS))
    # Not vacuous: many recipes of each kind.
    assert STATS["accepted and trained"] >= EXAMPLES // 6, dict(STATS)
    assert STATS["refused"] >= EXAMPLES // 3, dict(STATS)


# ---------------------------------------------------------------------------------------------------- both paths agree

AGREEMENT_CASES = [
    [ok("optimizer._component_=sgd", "optimizer.lr=0.05")],
    [sets("optimizer._component_", "lbfgs")],
    [sets("train.seed", 2**70), sets("model.num_classes", 0)],
]


@pytest.mark.parametrize("mutations", AGREEMENT_CASES, ids=["valid", "lbfgs", "two-problems"])
def test_in_process_matches_a_real_process(base: Path, tmp_path: Path, mutations: list[Mutation]):
    overrides = [o for m in mutations for o in m.overrides]
    for verb in ("validate", "train"):
        run_dirs = [tmp_path / f"{verb}-{where}" / "run" for where in ("in", "sub")]
        with ThreadPoolExecutor(1) as pool:  # the subprocess starts while this process runs its own
            sub = pool.submit(in_subprocess, [verb, str(base), *overrides, f"run_dir={run_dirs[1]}"], tmp_path)
            here = in_process([verb, str(base), *overrides, f"run_dir={run_dirs[0]}"], tmp_path)
            there = sub.result()
        assert here.code == there.code, (here, there)
        if here.code != 0:  # (a run's warnings show once per process: an earlier run here may have shown them)
            assert here.stderr.replace(str(run_dirs[0]), "RUN") == there.stderr.replace(str(run_dirs[1]), "RUN")
        elif verb == "train":
            assert_trained(here, run_dirs[0])
            assert_trained(there, run_dirs[1])
