"""LoRA (`model.lora`) with real processes on the tiny Llama of test_hf.py: only the adapters train, under DDP,
FSDP and ZeRO-3; checkpoints of a pretrained base hold only the adapters; a killed run resumes bitwise; the
adapter export loads with peft and the merged one with from_pretrained, both giving the trained model's logits.
Bad target modules and QLoRA on a CPU are refused in one line, exit 2, by validate and train alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import finish, refused_alike, run_cli, start_ranks
from test_distributed import TIMEOUT
from test_hf import (  # noqa: F401 (data: a fixture)
    STRATEGIES,
    data,
    kill_after_a_checkpoint,
    logged_val_loss,
    losses,
    recipe,
    save_llama,
    val_loss,
)

from launcher import checkpoint

pytest.importorskip("peft")

LORA = "lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"


def lora_recipe(data: Path, tmp_path: Path) -> Path:  # noqa: F811
    path = recipe(data, tmp_path)
    path.write_text(
        path.read_text().replace("{_component_: hf_causal_lm,", "{_component_: hf_causal_lm, " + LORA + ",")
    )
    return path


def pretrained_base(data: Path, tmp_path: Path) -> Path:  # noqa: F811
    """The recipe's Llama with the tokenizer's vocabulary, saved as a pretrained directory."""
    save_llama(tmp_path / "base", 320, tied=True, seed=3)
    return tmp_path / "base"


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / checkpoint.step_dir_name(step)
    return checkpoint.FORMATS[checkpoint.checkpoint_format(path)].weights(path)


def adapters_all_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    adapters = [k for k in after if ".lora_" in k]
    assert len(adapters) == 2 * 2 * 2  # A and B of q_proj and v_proj in 2 layers
    assert all(not torch.equal(before[k], after[k]) for k in adapters)


def export(run_dir: Path, out: Path, *extra: str) -> Path:
    proc = run_cli(
        "ckpt", "export", str(run_dir / "checkpoints" / "latest"), "--format", "hf", "--out", str(out), *extra
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_lora_on_a_config_base_resumes_bitwise_changes_only_adapters_and_exports(data: Path, tmp_path: Path):  # noqa: F811
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    path = lora_recipe(data, tmp_path)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    proc = run_cli("train", str(path), f"run_dir={full}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resumed_from = kill_after_a_checkpoint(
        start_ranks(1, "train", str(path), f"run_dir={crashed}", cwd=tmp_path), crashed / "checkpoints"
    )
    results = finish(start_ranks(1, "train", str(path), f"run_dir={crashed}", "resume=auto", cwd=tmp_path), TIMEOUT)
    assert results[0][0] == 0 and f"at step {resumed_from}" in results[0][1], results
    assert losses(crashed) == losses(full) and sorted(losses(full)) == list(range(1, 13))  # bitwise

    # A base built from a config is kept whole: it is the same at every checkpoint, every adapter moved.
    before, after = weights(full, 4), weights(full, 12)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in after if ".lora_" not in k)
    adapters_all_changed(before, after)

    adapter = export(full, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    peft_loss, peft_logits = val_loss(AutoPeftModelForCausalLM.from_pretrained(adapter), data)
    merged, info = AutoModelForCausalLM.from_pretrained(
        export(full, tmp_path / "merged", "--merge"), output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    merged_loss, merged_logits = val_loss(merged, data)
    assert torch.allclose(peft_logits, merged_logits, atol=1e-5)
    assert abs(peft_loss - logged_val_loss(full)) < 1e-5 and abs(merged_loss - logged_val_loss(full)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_lora_on_a_pretrained_base_trains_on_two_processes_and_keeps_only_adapters(
    data: Path,  # noqa: F811
    tmp_path: Path,
    name: str,
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = pretrained_base(data, tmp_path)
    run_dir = tmp_path / "run"
    args = ["~model.config", f"model.pretrained={base}", "train.max_steps=4", "checkpoint.every_steps=2"]
    args += ["eval.every_steps=4", *STRATEGIES[name]]
    results = finish(
        start_ranks(2, "train", str(lora_recipe(data, tmp_path)), f"run_dir={run_dir}", *args, cwd=tmp_path), TIMEOUT
    )
    assert [rc for rc, _, _ in results] == [0, 0], results
    # The checkpoints hold the adapters alone (the base is loaded again from its directory), each one moved.
    before, after = weights(run_dir, 2), weights(run_dir, 4)
    assert after.keys() == {k for k in after if ".lora_" in k}
    adapters_all_changed(before, after)
    # The pretrained base with the exported adapter gives the val/loss the run logged: the base did not move.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), export(run_dir, tmp_path / "adapter"))
    assert abs(val_loss(model, data)[0] - logged_val_loss(run_dir)) < 1e-5


REFUSALS = {
    "targets": (
        ["model.lora.target_modules=[q_proj, qkv]"],
        "model.lora.target_modules: qkv: no such module in LlamaForCausalLM (its linear layers: q_proj, k_proj,",
    ),
    "qlora": (["model.lora.quantize=4bit"], "model.lora.quantize: 4-bit bases need a CUDA GPU and bitsandbytes"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_lora_is_refused_in_one_line_by_validate_and_train(data: Path, tmp_path: Path, case: str):  # noqa: F811
    if case == "qlora" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides, expected = REFUSALS[case]
    lines = refused_alike(lora_recipe(data, tmp_path), *overrides, work=tmp_path / "work")
    assert len(lines) == 1 and lines[0].startswith(expected), lines
