"""Strategies with real processes: FSDP2 (torch's fully_shard over gloo) and DeepSpeed ZeRO-2/3 train the same run
as DDP, write one shard per process, resume, and export one weights file equal to DDP's parameters. Plus the pure
parts: the generated DeepSpeed config and the memory estimate."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, finish, read_metrics, reseal, run_cli, start_ranks
from safetensors.torch import load_file
from test_distributed import TIMEOUT

from launcher import strategies
from launcher.components import Component
from launcher.errors import RunFailed
from launcher.extensions import BUILD_NOTICE_AFTER_S, build_lock_watch
from launcher.recipe import load_recipe
from launcher.strategies.deepspeed import DeepSpeed, model_width, zero_defaults

STRATEGIES = {
    "ddp": [],
    "fsdp": ["strategy.name=fsdp", "strategy.fsdp.wrap=[Linear]"],
    "zero2": ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"],
}
# Clipping active on most steps (norms are 0.3-0.9) and 2 micro-batches per update: the global norm, after sync.
# Weight decay on the weights only (the optimizer's two param groups): each strategy must keep the groups apart.
RUN = [
    "optimizer.weight_decay=0.01",
    "train.max_steps=20",
    "train.clip_grad_norm=0.5",
    "train.gradient_accumulation_steps=2",
    "checkpoint.every_steps=10",
    "strategy.timeout_s=60",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same recipe trained with each strategy on 2 processes."""
    root = tmp_path_factory.mktemp("strategies")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    done = {}
    for name, overrides in STRATEGIES.items():
        procs = start_ranks(2, "train", str(recipe), f"run_dir={root / name}", *RUN, *overrides, cwd=root)
        results = finish(procs, TIMEOUT)
        assert [rc for rc, _, _ in results] == [0, 0], results
        done[name] = root / name
    return done


def curve(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3"])
def test_a_sharded_strategy_trains_the_same_run_as_ddp(runs: dict[str, Path], name: str):
    for key in ("train/loss", "grad_norm"):
        ddp, other = curve(runs["ddp"], key), curve(runs[name], key)
        assert sorted(other) == list(range(1, 21))
        assert all(abs(other[s] - ddp[s]) < 1e-5 for s in ddp), (key, ddp, other)
    assert json.loads((runs[name] / "env.json").read_text())["strategy"] == STRATEGIES[name][0].split("=")[1]


@pytest.mark.slow
def test_each_process_writes_its_own_shard(runs: dict[str, Path]):
    fsdp = runs["fsdp"] / "checkpoints" / "step_00000020"
    assert sorted(p.name for p in (fsdp / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (fsdp / "model.safetensors").exists()
    for name in ("zero2", "zero3"):
        ds = runs[name] / "checkpoints" / "step_00000020"
        files = sorted(p.name for p in (ds / "deepspeed").iterdir())
        assert [f for f in files if "optim_states" in f] == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ], files
        assert json.loads((ds / "trainer_state.json").read_text())["format"] == "deepspeed"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3"])
def test_export_consolidates_the_shards_into_the_models_parameters(runs: dict[str, Path], name: str, tmp_path: Path):
    out = tmp_path / f"{name}.safetensors"
    proc = run_cli("ckpt", "export", str(runs[name] / "checkpoints" / "latest"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    exported = load_file(str(out))
    # DDP's checkpoint holds the model's parameters as they are; the sharded runs trained the same model.
    reference = load_file(str(runs["ddp"] / "checkpoints" / "step_00000020" / "model.safetensors"))
    assert sorted(exported) == sorted(reference)
    for key, tensor in reference.items():
        assert exported[key].dtype == torch.float32
        assert torch.allclose(exported[key], tensor, atol=1e-6), key


@pytest.mark.slow
def test_resuming_with_another_strategy_is_refused(runs: dict[str, Path], tmp_path: Path):
    recipe = runs["ddp"].parent / "tiny.yaml"
    proc = run_cli(
        "train", str(recipe), f"run_dir={runs['fsdp']}", *RUN, "train.max_steps=30", "resume=auto", cwd=tmp_path
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "was written with strategy.name=fsdp (dcp format); this run uses ddp" in last, last


EVIL_METADATA = """\
import os, pickle, sys

class Boom:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))

with open(sys.argv[1], "wb") as f:
    pickle.dump(Boom(), f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_a_tampered_shard_is_refused_not_run(runs: dict[str, Path], tmp_path: Path, name: str):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs[name], copy)
    ckpt = copy / "checkpoints" / "step_00000020"
    target = (
        ckpt / "dcp" / ".metadata"
        if name == "fsdp"
        else ckpt / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    witness = tmp_path / "payload-ran"
    (tmp_path / "evil.py").write_text(EVIL_METADATA)
    subprocess.run([sys.executable, str(tmp_path / "evil.py"), str(target), str(witness)], check=True)
    reseal(ckpt)

    export = run_cli("ckpt", "export", str(ckpt), "--out", str(tmp_path / "w.safetensors"))
    assert export.returncode == 2 and not witness.exists(), export.stderr
    assert "is not plain tensors; refusing to load it" in export.stderr.strip().splitlines()[-1]

    recipe = runs["ddp"].parent / "tiny.yaml"
    procs = start_ranks(
        2,
        "train",
        str(recipe),
        f"run_dir={copy}",
        *RUN,
        *STRATEGIES[name],
        "train.max_steps=30",
        "resume=auto",
        cwd=tmp_path,
    )
    results = finish(procs, TIMEOUT)
    assert not witness.exists()
    assert results[0][0] == 2, results
    assert "is not plain tensors; refusing to load it" in results[0][2].strip().splitlines()[-1]


@pytest.mark.slow
def test_an_fsdp_wrap_class_the_model_lacks_is_named(tiny_recipe: Path, tmp_path: Path):
    procs = start_ranks(
        2,
        "train",
        str(tiny_recipe),
        f"run_dir={tmp_path / 'run'}",
        "strategy.name=fsdp",
        "strategy.fsdp.wrap=[Block]",
        "strategy.timeout_s=60",
        cwd=tmp_path,
    )
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [2, 2], results
    last = results[0][2].strip().splitlines()[-1]
    wanted = f"error: {tiny_recipe}: strategy.fsdp.wrap: the model has no module of class Block;"
    assert last.startswith(wanted) and "Linear" in last, last
    assert not (tmp_path / "run").exists()  # found in the recipe, before anything was written


# ---------------------------------------------------------------------------------------------------- pure


def recipe_with(*overrides: str, tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE)
    return load_recipe(path, list(overrides))


def test_the_deepspeed_config_takes_batch_clipping_and_precision_from_the_recipe(tmp_path: Path):
    recipe = recipe_with(
        "strategy.name=deepspeed",
        "strategy.deepspeed.zero_stage=3",
        "strategy.deepspeed.offload_optimizer=true",
        "train.batch_size=8",
        "train.gradient_accumulation_steps=4",
        "train.clip_grad_norm=0.7",
        "train.mixed_precision=bf16",
        tmp_path=tmp_path,
    )
    user = {"zero_optimization": {"stage3_prefetch_bucket_size": 1000}, "gradient_clipping": "auto"}
    config = strategies.deepspeed_config(recipe, processes=16, user=user)
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 8 * 4 * 16
    assert config["gradient_clipping"] == 0.7
    assert config["bf16"] == {"enabled": True} and config["fp16"]["enabled"] is False
    # The MLP gives no hidden size: DeepSpeed's own bucket sizes stand, the user's value is kept.
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "stage3_prefetch_bucket_size": 1000,
        **zero_defaults(3, None),
    }
    assert strategies.user_config_problems(recipe, user) == []
    no_clip = recipe_with("strategy.name=deepspeed", "train.clip_grad_norm=null", tmp_path=tmp_path)
    assert strategies.deepspeed_config(no_clip, 2)["gradient_clipping"] == 0.0


def test_the_deepspeed_config_has_the_documented_zero_defaults_sized_to_the_model_under_the_users_json(
    tmp_path: Path,
):
    zero3 = recipe_with("strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3", tmp_path=tmp_path)
    gpt = dataclasses.replace(zero3, model=Component("gpt", {"n_layer": 2, "n_head": 4, "n_embd": 256}))
    zero = strategies.deepspeed_config(gpt, 2)["zero_optimization"]
    # Accelerate's and transformers' "auto" values for a hidden size h: h^2, 0.9 h^2, 10 h.
    assert zero == {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 256 * 256,
        "stage3_prefetch_bucket_size": int(0.9 * 256 * 256),
        "stage3_param_persistence_threshold": 2560,
        "stage3_max_live_parameters": 10**9,
        "stage3_max_reuse_distance": 10**9,
        "sub_group_size": 10**9,
    }
    user = {"zero_optimization": {"stage3_param_persistence_threshold": 0, "overlap_comm": False}}
    mine = strategies.deepspeed_config(gpt, 2, user)["zero_optimization"]
    assert mine["stage3_param_persistence_threshold"] == 0 and mine["overlap_comm"] is False
    assert mine["reduce_bucket_size"] == 256 * 256 and mine["stage"] == 3
    # ZeRO-2 has no parameters to gather: its buckets only; ZeRO-1 keeps DeepSpeed's own values.
    zero2 = dataclasses.replace(gpt, strategy=recipe_with("strategy.name=deepspeed", tmp_path=tmp_path).strategy)
    assert strategies.deepspeed_config(zero2, 2)["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 256 * 256,
    }
    assert zero_defaults(1, 256) == {}
    hf = Component("hf_causal_lm", {"config": {"model_type": "llama", "hidden_size": 512}})
    assert model_width(hf) == 512 and model_width(Component("mlp", {"hidden_sizes": [32]})) is None


ALONE_NOTE = (
    "note: ZeRO-3 on one process shards nothing but still gathers and releases every module's parameters at each "
    "use: DDP or FSDP2 trains faster here (strategy.name=ddp)"
)


def test_zero3_says_it_shards_nothing_only_on_one_process_without_offloading(tiny_recipe: Path):
    """(A one-process ZeRO-3 run says it: test_a_deepspeed_run_on_the_cpu_builds_no_extension.)"""
    zero3 = ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"]
    assert DeepSpeed(load_recipe(tiny_recipe, zero3), 1).alone_note(1) == ALONE_NOTE.removeprefix("note: ")
    # Not where there is something to shard, nor where offloading is the point.
    recipe = load_recipe(tiny_recipe, zero3)
    assert DeepSpeed(recipe, 2).alone_note(2) is None
    offload = load_recipe(tiny_recipe, [*zero3, "strategy.deepspeed.offload_params=true"])
    assert DeepSpeed(offload, 1).alone_note(1) is None


def test_a_deepspeed_json_that_contradicts_the_recipe_is_refused(tmp_path: Path):
    user_file = tmp_path / "ds.json"
    user_file.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam"}}))
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    proc = run_cli(
        "validate", str(tmp_path / "r.yaml"), "strategy.name=deepspeed", f"strategy.deepspeed.config={user_file}"
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "sets train_micro_batch_size_per_gpu=4 but the recipe gives 32" in lines[0]
    assert "has an 'optimizer' section" in lines[1]


def test_memory_per_process_follows_the_zero_stages():
    gib = 2**30
    p = 1_000_000_000  # 1B parameters, Adam, bf16
    ddp = strategies.memory_per_process(p, "ddp", 0, 8, "bf16", 2)
    assert (ddp["parameters"], ddp["gradients"], ddp["optimizer"]) == (4 * p, 4 * p, 8 * p)
    z = {s: strategies.memory_per_process(p, "deepspeed", s, 8, "bf16", 2) for s in (1, 2, 3)}
    assert z[1] == {"parameters": 2 * p, "gradients": 2 * p, "optimizer": 12 * p / 8}
    assert z[2]["gradients"] == 2 * p / 8 and z[2]["parameters"] == 2 * p
    assert z[3]["parameters"] == 2 * p / 8 and sum(z[3].values()) / gib == pytest.approx(16 * p / 8 / gib)
    fsdp = strategies.memory_per_process(p, "fsdp", 0, 4, "no", 2)
    assert sum(fsdp.values()) == 16 * p / 4
    assert strategies.optimizer_slots("sgd", {"momentum": 0.9}) == 1
    assert strategies.optimizer_slots("sgd", {}) == 0
    assert strategies.optimizer_slots("adamw", {}) == 2


# ---------------------------------------------------------------------------------------------------- LM recipes

# The small CPU variant each GPT recipe documents in its header.
GPT_CPU = [
    "data.dataset.vocab_size=256",
    "data.dataset.block_size=64",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "train.batch_size=8",
    "train.gradient_accumulation_steps=1",
    "eval.every_steps=20",
    "eval.max_batches=4",
    "checkpoint.every_steps=20",
    "scheduler.warmup_steps=5",
    "logging.every_steps=5",
    "strategy.timeout_s=60",
]


@pytest.fixture(scope="module")
def byte_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import SHAKESPEARE

    if not SHAKESPEARE.is_file():  # as every test that reads the corpus
        pytest.skip(f"needs {SHAKESPEARE}")
    out = tmp_path_factory.mktemp("tokens")
    proc = run_cli("tokenize", str(SHAKESPEARE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "train.bin").stat().st_size == 2 * int(0.9 * SHAKESPEARE.stat().st_size)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_ddp", "gpt_fsdp", "gpt_zero3"])
def test_a_gpt_recipe_trains_checkpoints_resumes_and_exports_on_two_processes(
    byte_tokens: Path, tmp_path: Path, name: str
):
    from conftest import REPO

    from launcher.models.gpt import GPT

    run_dir = tmp_path / "run"
    args = ["train", str(REPO / "recipes" / f"{name}.yaml"), f"run_dir={run_dir}", *GPT_CPU]
    args.append(f"data.dataset.path={byte_tokens}/{{split}}.bin")
    results = finish(start_ranks(2, *args, "train.max_steps=20", cwd=tmp_path), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    results = finish(start_ranks(2, *args, "train.max_steps=40", "resume=auto", cwd=tmp_path), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert "resumed from" in results[0][1] and "at step 20" in results[0][1]

    val = curve(run_dir, "val/loss")
    assert sorted(val) == [20, 40] and val[40] < val[20] < 5.0, val  # uniform guessing is ln 256 = 5.55
    assert sorted(curve(run_dir, "train/loss")) == list(range(5, 41, 5))
    state = json.loads((run_dir / "checkpoints" / "step_00000040" / "trainer_state.json").read_text())
    assert state["format"] == {"gpt_ddp": "full", "gpt_fsdp": "dcp", "gpt_zero3": "deepspeed"}[name]
    assert state["world_size"] == 2 and state["decay"] == "matrices"  # two param groups, resumed as written
    # The GPT's own formula, on the parameters as built (ZeRO-3 and FSDP leave each rank only a part of them).
    per_token = GPT(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64).flops_per_token(64)
    assert json.loads((run_dir / "env.json").read_text())["flops_per_update"] == 8 * 64 * per_token

    out = tmp_path / "model.safetensors"
    proc = run_cli("ckpt", "export", str(run_dir / "checkpoints" / "latest"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    model = GPT(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
    model.load_state_dict(load_file(str(out)), strict=True)


@pytest.mark.slow
def test_fsdp_activation_checkpointing_and_offload_train_the_same_run(byte_tokens: Path, tmp_path: Path):
    from conftest import REPO

    base = [
        "train",
        str(REPO / "recipes" / "gpt_fsdp.yaml"),
        *GPT_CPU,
        f"data.dataset.path={byte_tokens}/{{split}}.bin",
    ]
    base.append("train.max_steps=20")
    plain, other = tmp_path / "plain", tmp_path / "other"
    extra = ["strategy.fsdp.activation_checkpointing=true", "strategy.fsdp.cpu_offload=true"]
    for run_dir, options in ((plain, []), (other, extra)):
        results = finish(start_ranks(2, *base, f"run_dir={run_dir}", *options, cwd=tmp_path), TIMEOUT)
        assert [rc for rc, _, _ in results] == [0, 0], results
    a, b = curve(plain, "train/loss"), curve(other, "train/loss")
    assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


# ---------------------------------------------------------------------------------------------------- C++ extensions


def test_a_wait_on_a_build_lock_is_named_and_given_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from torch.utils.file_baton import FileBaton

    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    started = time.monotonic()
    with build_lock_watch(BUILD_NOTICE_AFTER_S + 1), pytest.raises(RunFailed) as failed:
        FileBaton(str(lock)).wait()
    assert BUILD_NOTICE_AFTER_S + 1 <= time.monotonic() - started < BUILD_NOTICE_AFTER_S + 5
    assert failed.value.message.startswith(f"error: {lock} was still there after ")
    assert capsys.readouterr().err.startswith(f"warning: waiting for {lock}: ")

    # A lock released in time (the other process's build finished) ends the wait, without a word.
    threading.Timer(0.3, lock.unlink).start()
    with build_lock_watch(30):
        FileBaton(str(lock)).wait()
    assert capsys.readouterr().err == ""
    assert FileBaton.wait is not None and "launcher" not in FileBaton.wait.__module__  # torch's own again


@pytest.mark.slow
def test_a_run_waiting_on_a_stale_build_lock_says_so_and_ends_within_its_timeout(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The run's own extensions folder: a lock in the machine's would hold up every other DeepSpeed run there.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("cpu_adam", verbose=False)) / "lock"
    lock.touch()  # what a build killed mid-way leaves
    timeout_s = 6
    cmd = [
        *(sys.executable, "-m", "launcher", "train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}"),
        *("strategy.name=deepspeed", f"strategy.timeout_s={timeout_s}"),
        "optimizer._component_=deepspeed.ops.adam.DeepSpeedCPUAdam",  # ZeRO-Offload's optimizer: a C++ op
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stderr))
    reader.start()
    try:
        proc.wait(timeout=240)
    finally:
        proc.kill()
        reader.join()
    ended = time.monotonic()
    said = [(t, line) for t, line in lines if line.startswith(f"warning: waiting for {lock}: ")]
    assert said, lines
    assert "a killed build left it: remove it" in said[0][1]
    # The notice comes seconds into the wait, the end at its timeout: the gap is the timeout less those seconds.
    assert ended - said[0][0] < timeout_s + 10, lines
    stderr = "".join(line for _, line in lines)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: {lock} was still there after {timeout_s} s "), stderr
    assert lock.exists()  # someone else's, for all the run knows
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's communication op")
def test_a_deepspeed_run_on_the_cpu_builds_no_extension(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    extensions = tmp_path / "extensions"
    extensions.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    run = ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3", "train.max_steps=4"]
    run += ["checkpoint.every_steps=2", "eval.every_steps=2"]
    done = run_cli("train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}", *run, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "shards nothing" in line] == [ALONE_NOTE], done.stderr
    resumed = run_cli(
        "train",
        str(tiny_recipe),
        f"run_dir={tmp_path / 'run'}",
        *run,
        "train.max_steps=6",
        "resume=auto",
        cwd=tmp_path,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(extensions.iterdir()) == []
