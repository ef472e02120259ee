"""What a new user of the Hugging Face models meets: a Hub name where the Hub cannot be reached (or HF_HUB_OFFLINE is
set) is refused in one line at once, an unknown model_type with the nearest names, `pretrained` naming a file as a
file; a bad recipe is refused before `transformers` and `datasets` are imported; `launcher plan` estimates a Hugging
Face model's activation memory close to what its forward saves for backward on the CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, run_cli
from test_hf import data, recipe  # noqa: F401  (the fixture, and the recipe it fills in)

from launcher.components import ArgumentProblem

pytest.importorskip("datasets")
pytest.importorskip("transformers")


def only_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]  # not the progress bars
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def validate_alone(*args: str, cwd: Path) -> tuple[str, float]:
    """The one line `launcher validate` refuses the recipe with, and how long it took."""
    start = time.monotonic()
    proc = run_cli("validate", *args, cwd=cwd)
    return only_error(proc), time.monotonic() - start


def test_a_hub_name_without_the_hub_is_refused_in_one_line_at_once(
    data: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    from launcher.models.hf import load_config

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = str(recipe(data, tmp_path))
    # The libraries' retries took 49 to 118 s before their last line; the check, a refused connection: no time.
    line, took = validate_alone(path, "data.dataset.path=org/set", cwd=tmp_path)
    assert "data.dataset.path: 'org/set' is not a local directory, so it is a Hub dataset name" in line
    assert "cannot be reached" in line and "HF_HUB_OFFLINE" in line and "local directory" in line and took < 30
    start = time.monotonic()
    with pytest.raises(ArgumentProblem, match=r"'org/model' is not a local directory, so it is a Hub model name"):
        load_config("org/model", None)
    assert time.monotonic() - start < 10

    # Offline, with an empty cache: the same refusal, without a try.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    line, took = validate_alone(path, "data.dataset.tokenizer=org/tokenizer", cwd=tmp_path)
    assert "data.dataset.tokenizer: 'org/tokenizer' is not a local directory, so it is a Hub tokenizer name" in line
    assert "HF_HUB_OFFLINE is set but the Hugging Face cache has no copy of it" in line and took < 30


def test_an_unknown_model_type_and_a_file_as_pretrained_are_named_in_one_short_line(tmp_path: Path):
    from launcher.models.hf import load_config

    with pytest.raises(ArgumentProblem) as caught:
        load_config(None, {"model_type": "lama"})
    assert caught.value.arg == "config.model_type" and "did you mean llama" in caught.value.message
    assert "\n" not in caught.value.message and len(caught.value.message) < 200
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ArgumentProblem, match=r"model.safetensors is a file; expected a saved model's directory"):
        load_config(str(tmp_path / "model.safetensors"), None)


# Each bad recipe's refusal, as `launcher validate` and `train` give it, with the modules it leaves unimported.
FAST = """\
import json, sys, time
from launcher.cli import main
out = []
for overrides in json.loads(sys.argv[2]):
    start = time.monotonic()
    code = main(["validate", sys.argv[1], *overrides])
    out.append([code, time.monotonic() - start, [m for m in ("transformers", "datasets") if m in sys.modules]])
print(json.dumps(out))
"""


def test_a_bad_recipe_is_refused_before_transformers_and_datasets_are_imported(
    data: Path,  # noqa: F811
    tmp_path: Path,
):
    bad = [["model.dtype=float64"], [f"data.dataset.path={data / 'nowhere.jsonl'}"], ["train.bogus=1"]]
    proc = subprocess.run(
        [sys.executable, "-c", FAST, str(recipe(data, tmp_path)), json.dumps(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    results = json.loads(proc.stdout.splitlines()[-1])
    assert [code for code, _, _ in results] == [2, 2, 2], proc.stderr
    assert [imported for _, _, imported in results] == [[], [], []]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert [e.split(": ")[2] for e in errors] == ["model.dtype", "data.dataset.path", "train.bogus"], proc.stderr


def saved_for_backward(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors a real forward and loss save for backward, each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values())


def test_plan_estimates_a_hugging_face_models_activations_close_to_a_measured_forward(
    data: Path,  # noqa: F811
    tmp_path: Path,
):
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    args = [f"data.dataset.path={data / 'text.jsonl'}", f"data.dataset.cache_dir={tmp_path / 'cache'}"]
    proc = run_cli("plan", str(REPO / "recipes" / "hf_causal_lm.yaml"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"none ([\d.]+) (MiB|KiB)", proc.stdout)
    assert found, proc.stdout
    planned = float(found[1]) * (2**20 if found[2] == "MiB" else 2**10)

    shipped = yaml.safe_load((REPO / "recipes" / "hf_causal_lm.yaml").read_text())
    fields = dict(shipped["model"]["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, vocab_size=257, use_cache=False)  # bytes
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=shipped["model"]["attn_implementation"])
    ids = torch.randint(0, 257, (shipped["train"]["batch_size"], shipped["data"]["dataset"]["block_size"]))
    measured = saved_for_backward(model.train(), ids)
    assert measured / 1.5 < planned < measured * 1.5, (planned, measured)
