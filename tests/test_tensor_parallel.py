"""Tensor parallelism and 2-D meshes (FSDP2 x TP) with real processes over gloo: the losses and gradient norms of
DDP on the same global batch, with clipping and accumulation; resumes on other meshes; a SIGKILLed run that
resumes bitwise; export; and the meshes and plans refused before anything starts."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, refused_alike, run_cli
from safetensors.torch import load_file

from launcher.models.gpt import GPT

TIMEOUT = 240
# Clipping bites (the norms are about 1) and two micro-batches make each update.
GPT_RECIPE = """\
model: {_component_: gpt, n_layer: 2, n_head: 4, n_embd: 32}
data:
  dataset: {_component_: char_text, path: text.txt, block_size: 32, val_fraction: 0.1}
optimizer: {_component_: adamw, lr: 0.003}
train: {max_steps: 6, batch_size: 4, seed: 2, gradient_accumulation_steps: 2, clip_grad_norm: 0.5}
eval: {every_steps: 3, every_epoch: false, max_batches: 3}
checkpoint: {every_steps: 3, keep_last: 5}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
strategy: {timeout_s: 60}
"""
LLAMA = (
    "{_component_: hf_causal_lm, config: {model_type: llama, hidden_size: 32, intermediate_size: 64, "
    "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64, "
    "tie_word_embeddings: true}}"
)
FSDP = "strategy.name=fsdp"


def train(root: Path, run: str, processes: int, *overrides: str, recipe: str = "gpt.yaml", **kw) -> None:
    args = ["train", recipe, f"run_dir={run}", *overrides]
    proc = run_cli(*args, *(["--processes", str(processes)] if processes > 1 else []), cwd=root, timeout=TIMEOUT, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(
    run_dir: Path, keys: tuple[str, ...] = ("train/loss", "grad_norm", "val/loss")
) -> dict[tuple[int, str], float]:
    """Every logged loss, gradient norm and validation loss (or `keys`), by step."""
    return {(r["step"], k): r[k] for r in read_metrics(run_dir) for k in keys if r.get(k) is not None}


def assert_close(run: dict, reference: dict, tolerance: float = 1e-5) -> None:
    assert run and set(run) <= set(reference)
    worst = max(abs(v - reference[k]) for k, v in run.items())
    assert worst < tolerance, (worst, run, reference)


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 6 updates of a global batch of 8 on DDP (2 x 4), tensor parallelism alone (1 x 2, one batch of
    8) and a 2 x 2 mesh (2 data ranks x 2 tensor-parallel, batches of 4; its blocks recomputed in backward)."""
    root = tmp_path_factory.mktemp("tp")
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "away", "from"]
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
    (root / "gpt.yaml").write_text(GPT_RECIPE)
    train(root, "ddp", 2)
    train(root, "tp", 2, FSDP, "strategy.tp=2", "train.batch_size=8")
    train(root, "mesh", 4, FSDP, "strategy.tp=2", "train.activation_checkpointing=full")
    return root


def test_tensor_parallel_and_2d_meshes_give_ddps_losses_and_norms(gpt_runs: Path):
    reference = rows(gpt_runs / "ddp")
    assert {k for _, k in reference} == {"train/loss", "grad_norm", "val/loss"} and len(reference) == 14
    for run in ("tp", "mesh"):
        assert_close(rows(gpt_runs / run), reference)
        assert rows(gpt_runs / run).keys() == reference.keys()
    # Each process's share of an update's FLOPs (for its MFU): a tensor-parallel group shares its data rank's.
    flops = [json.loads((gpt_runs / run / "env.json").read_text())["flops_per_update"] for run in ("ddp", "tp", "mesh")]
    assert flops[0] == flops[1] == 2 * flops[2]
    state = json.loads((gpt_runs / "mesh" / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert (state["world_size"], state["data_ranks"]) == (4, 2)
    report = run_cli("report", str(gpt_runs / "mesh")).stdout
    assert "4 per process x 2 accumulated = 16 per update" in report
    assert "fsdp, 4 process(es) (2 data ranks x 2 tensor-parallel)" in report


@pytest.mark.parametrize(
    ("processes", "mesh"),
    [(4, ["train.batch_size=2"]), (4, ["strategy.tp=4", "train.batch_size=8"]), (1, ["train.batch_size=8"])],
    ids=["4x1", "1x4", "one-process"],
)
def test_a_2d_checkpoint_resumes_exactly_on_another_mesh(gpt_runs: Path, processes: int, mesh: list[str]):
    """From the 2 x 2 mesh's checkpoint at update 3, on FSDP alone, tensor parallelism alone and one process, each
    reading the same global batch: the updates after it are DDP's."""
    run = f"from-mesh-{processes}-{len(mesh)}"
    saved = gpt_runs / "mesh" / "checkpoints" / "step_00000003"
    proc = train(gpt_runs, run, processes, FSDP, *mesh, f"resume={saved}")
    assert "the model, optimizer and schedule are exact" in proc.stdout + proc.stderr
    resumed = rows(gpt_runs / run)
    assert min(step for step, _ in resumed) == 4
    assert_close(resumed, rows(gpt_runs / "ddp"))


def test_export_of_a_2d_checkpoint_equals_ddps(gpt_runs: Path):
    tensors = {}
    for run in ("ddp", "mesh"):
        out = gpt_runs / f"{run}.safetensors"
        proc = run_cli("ckpt", "export", str(gpt_runs / run / "checkpoints" / "step_00000006"), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        tensors[run] = load_file(out)
    assert tensors["ddp"].keys() == tensors["mesh"].keys()
    assert all(torch.allclose(tensors["ddp"][k], tensors["mesh"][k], atol=1e-5) for k in tensors["ddp"])


def test_a_tiny_llama_on_a_2d_mesh_gives_ddps_losses_resumes_and_exports(gpt_runs: Path):
    """Hugging Face's plan for Llama (from its config), tied embeddings split by vocabulary, grouped key-value
    heads, on 2 x 2 against one process reading the same global batch; its checkpoint resumed on one process; both
    exported in the Hugging Face format, alike."""
    recipe = gpt_runs / "llama.yaml"
    recipe.write_text(
        GPT_RECIPE.replace("{_component_: gpt, n_layer: 2, n_head: 4, n_embd: 32}", LLAMA)
        .replace("_component_: char_text", "_component_: hf_text, tokenizer: bytes")
        .replace("max_steps: 6", "max_steps: 4")
        .replace("every_steps: 3", "every_steps: 2")
    )
    train(gpt_runs, "llama-one", 1, "train.batch_size=8", recipe="llama.yaml")
    train(gpt_runs, "llama-mesh", 4, FSDP, "strategy.tp=2", recipe="llama.yaml")
    reference = rows(gpt_runs / "llama-one")
    assert_close(rows(gpt_runs / "llama-mesh"), reference)
    saved = gpt_runs / "llama-mesh" / "checkpoints" / "step_00000002"
    train(gpt_runs, "llama-resumed", 1, FSDP, "train.batch_size=8", f"resume={saved}", recipe="llama.yaml")
    assert_close(rows(gpt_runs / "llama-resumed"), reference)
    exported = []
    for run in ("llama-one", "llama-mesh"):
        out = gpt_runs / f"{run}-hf"
        checkpoint = gpt_runs / run / "checkpoints" / "step_00000004"
        proc = run_cli("ckpt", "export", str(checkpoint), "--format", "hf", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        exported.append(load_file(out / "model.safetensors"))
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.allclose(exported[0][k], exported[1][k], atol=1e-5) for k in exported[0])


# Cross-entropy, infinite on a micro-batch whose targets sum to a multiple of 13: on one data rank, not the other.
SOME_INFINITE = """
import torch


class InfOnSome(torch.nn.Module):
    def forward(self, output, target):
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss + (float("inf") if int(target.sum()) % 13 == 0 else 0.0)
"""


def test_a_killed_2d_run_restarts_and_resumes_bitwise(faulty: Path):
    """A model of the user's own, split by the recipe's plan on 2 x 2, whose loss is infinite on some micro-batches
    of one data rank (every process skips those updates); rank 1 SIGKILLed at update 25 (after the checkpoint at
    20): the restarted processes continue with the same losses and skips, bit for bit."""
    root = faulty.parent
    (root / "someinf.py").write_text(SOME_INFINITE)
    faulty.write_text(faulty.read_text() + "loss: {_component_: someinf.InfOnSome}\n")
    plan = ['strategy.tp.plan={"net.0": colwise, "net.2": rowwise}', FSDP, "strategy.tp.size=2"]
    train(root, "full", 4, *plan, recipe=faulty.name)
    proc = train(root, "restarted", 4, *plan, "--max-restarts", "1", recipe=faulty.name,
                 env={"FAULT": "kill", "FAULT_AT": "25", "ONCE": "1"})  # fmt: skip
    assert "rank 1 was killed by SIGKILL; restarting" in proc.stderr
    keys = ("train/loss", "grad_norm", "val/loss", "train/skipped_steps")
    full, restarted = (rows(root / run, keys) for run in ("full", "restarted"))
    assert full == restarted and max(step for step, _ in full) == 40
    assert 0 < max(v for (_, k), v in full.items() if k == "train/skipped_steps") < 10


def test_gpt_checkpoints_with_one_qkv_projection_still_load():
    """The built-in GPT's state dicts from before queries, keys and values had projections of their own."""
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    old = {k: v for k, v in model.state_dict().items() if ".attn.k." not in k and ".attn.v." not in k}
    for kind in ("weight",):
        q = old.pop(f"blocks.0.attn.q.{kind}")
        old[f"blocks.0.attn.qkv.{kind}"] = torch.cat(
            [q, *(model.state_dict()[f"blocks.0.attn.{n}.{kind}"] for n in "kv")]
        )
    again = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    again.load_state_dict(old)
    tokens = torch.randint(0, 11, (2, 8))
    assert torch.equal(model(tokens), again(tokens))


REFUSED = {
    "not fsdp": (["strategy.tp=2"], "strategy.tp: tensor parallelism runs with FSDP2 across the tensor-parallel "
                 "groups, not with strategy.name=ddp; set strategy.name=fsdp"),
    "heads": ([FSDP, "strategy.tp=3"], "strategy.tp.size: 3 does not divide the model's attention heads (4)"),
    "pattern": ([FSDP, "strategy.tp.size=2", 'strategy.tp.plan={"blocks.*.attn.qkv": colwise}'],
                "strategy.tp.plan: 'blocks.*.attn.qkv' names no module of GPT"),
    "style": ([FSDP, "strategy.tp.size=2", 'strategy.tp.plan={"ln_f": colwise}'],
              "strategy.tp.plan: ln_f is a LayerNorm: only Linear and Embedding modules split"),
    "unknown style": ([FSDP, "strategy.tp.size=2", 'strategy.tp.plan={"lm_head": sideways}'],
                      "strategy.tp.plan.lm_head: expected one of: colwise, rowwise, colwise_gather; got a string "
                      "('sideways')"),
    "compile": ([FSDP, "strategy.tp=2", "train.compile=true"],
                "train.compile: not yet with strategy.tp (tensor-parallel modules run eagerly); set it to false"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_invalid_meshes_and_plans_are_refused_in_one_line(tmp_path: Path, case: str):
    (tmp_path / "text.txt").write_text("the quick brown fox " * 200)
    recipe = tmp_path / "gpt.yaml"
    recipe.write_text(GPT_RECIPE.replace("path: text.txt", f"path: {tmp_path / 'text.txt'}"))
    overrides, line = REFUSED[case]
    assert refused_alike(recipe, *overrides, work=tmp_path / "work") == [line]


def test_a_mesh_the_processes_do_not_fill_is_refused_before_they_start(tmp_path: Path):
    (tmp_path / "text.txt").write_text("the quick brown fox " * 200)
    (tmp_path / "gpt.yaml").write_text(GPT_RECIPE)
    expected = "strategy.tp.size: 2 must divide the number of processes, 3: launch a multiple of 2 processes, or "
    for verb, extra in (("train", ["run_dir=run"]), ("plan", [])):
        proc = run_cli(verb, "gpt.yaml", FSDP, "strategy.tp=2", "--processes", "3", *extra, cwd=tmp_path)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_plan_shows_the_mesh_and_where_each_parameter_lives(tmp_path: Path):
    (tmp_path / "text.txt").write_text("the quick brown fox " * 200)
    (tmp_path / "gpt.yaml").write_text(GPT_RECIPE)
    out = run_cli("plan", "gpt.yaml", FSDP, "strategy.tp=4", "--processes", "8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "batch         4 per process x 2 data ranks (each a group of 4 processes reading one batch)" in text
    assert "mesh          8 processes = 2 data ranks (FSDP2) x 4 tensor-parallel" in text
    assert "blocks.*.attn.q.weight [32, 32]: rows; [4, 32] (x2)" in text
    assert "blocks.*.attn.proj.weight [32, 32]: columns; [16, 8] (x2)" in text
    assert "blocks.*.ln_1.weight [32]: whole; [16] (x2)" in text


def test_hugging_face_plans_come_from_the_config_and_styles_of_their_own_are_refused():
    transformers = pytest.importorskip("transformers")
    from launcher.recipe import load_recipe
    from launcher.recipe.schema import TensorParallelConfig
    from launcher.strategies import tensor_parallel

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = tensor_parallel.model_plan(model)
    assert plan["model.embed_tokens"] == "rowwise" and plan["lm_head"] == "colwise_gather"
    assert plan["model.layers.*.self_attn.k_proj"] == "colwise" and plan["model.layers.*.mlp.down_proj"] == "rowwise"
    plain = load_recipe(REPO / "recipes" / "quickstart.yaml", [FSDP], check_files=False, this_machine=False)
    recipe = dataclasses.replace(plain, strategy=dataclasses.replace(plain.strategy, tp=TensorParallelConfig(2)))
    assert tensor_parallel.plan_problems(model, recipe) == []
    model.config.base_model_tp_plan = {"layers.*.mlp.gate_proj": "local_colwise"}
    assert tensor_parallel.plan_problems(model, recipe) == [
        "strategy.tp: LlamaForCausalLM's own plan splits model.layers.*.mlp.gate_proj as 'local_colwise', which the "
        "launcher does not apply; give a plan of colwise, rowwise and colwise_gather in strategy.tp.plan"
    ]
