"""Hardening cases the fuzzing harness does not reach: non-finite weights, evaluation that would measure the wrong
thing, messages, and work folders on failure."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from infopt.errors import InfoptError
from tests.conftest import run_cli
from tests.test_cli import assert_clean_failure
from tests.tiny_models import copy_tokenizer, make_tiny_model


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, stories_hf):
    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path_factory.mktemp("nan") / "m", vocab_size=512))
    tensors = load_file(src / "model.safetensors")
    weight = tensors["model.layers.1.mlp.up_proj.weight"]
    weight.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_non_finite_weights_are_refused_naming_the_tensor(poisoned, tmp_path, method):
    out = tmp_path / "q"
    extra = ["--calib", "tinystories", "--calib-samples", "2", "--calib-seq-len", "32"] if method == "gptq" else []
    result = run_cli("quantize", str(poisoned), "--method", method, "--group-size", "32", *extra, "--out", str(out))
    assert_clean_failure(result, "model.layers.1.mlp.up_proj.weight holds 3 non-finite values", leftover_parent=tmp_path)
    assert "--allow-non-finite" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder, no work folder
    allowed = run_cli("quantize", str(poisoned), "--group-size", "32", "--allow-non-finite", "--out", str(out))
    assert allowed.returncode == 0, allowed.stderr


def test_evaluation_refuses_windows_it_cannot_score_honestly(stories_hf):
    context = json.loads((stories_hf / "config.json").read_text())["max_position_embeddings"]
    long = run_cli("eval", str(stories_hf), "--dataset", "tinystories", "--seq-len", str(context + 1))
    assert_clean_failure(long, f"exceeds the model's context ({context} tokens")
    zero = run_cli("eval", str(stories_hf), "--dataset", "tinystories", "--seq-len", "0")
    assert_clean_failure(zero, "--seq-len 0")


def test_run_prints_the_prompt_only_once_the_model_has_loaded(tmp_path, stories_hf):
    broken = tmp_path / "broken"
    shutil.copytree(stories_hf, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    result = run_cli("run", str(broken), "--prompt", "Once upon a time")
    assert_clean_failure(result, "too short for a header")
    assert result.stdout == ""  # not "Once upon a timeerror: ..."
    ok = run_cli("run", str(stories_hf), "--prompt", "Once upon a time", "--max-new-tokens", "4")
    assert ok.returncode == 0 and ok.stdout.startswith("Once upon a time")


def test_an_unknown_architecture_is_one_short_line(tmp_path, stories_hf):
    odd = tmp_path / "odd"
    shutil.copytree(stories_hf, odd)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "mystery"
    (odd / "config.json").write_text(json.dumps(config))
    result = run_cli("eval", str(odd), "--dataset", "tinystories")
    assert_clean_failure(result, "unknown architecture 'mystery'")
    assert len(result.stderr) < 400


def test_a_failing_calibrated_run_leaves_no_work_folder(tmp_path, stories_hf, monkeypatch):
    from infopt.errors import InfoptError
    from infopt.quant import gptq
    from infopt.workflows import CalibrationData, make_request, quantize, work_dir_for

    def fail(self, ctx):
        raise InfoptError("Hessian trouble")

    monkeypatch.setattr(gptq.GPTQMethod, "quantize_layer", fail)
    out = tmp_path / "q"
    with pytest.raises(InfoptError, match="Hessian trouble"):
        quantize(make_request(model=str(stories_hf), out=out, method="gptq", group_size=-1,
                              calibration=CalibrationData(dataset="tinystories", samples=2, seq_len=32)))
    assert not work_dir_for(out).exists() and list(tmp_path.iterdir()) == []


def test_output_errors_from_the_os_are_one_line(tmp_path, stories_hf):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("quantize", str(stories_hf), "--out", str(blocker / "q"))
    assert_clean_failure(result, "is not a folder")
    assert blocker.read_text() == "not a folder"


def test_the_finite_check_catches_every_non_finite_value_and_passes_huge_finite_ones():
    from types import SimpleNamespace

    from infopt.workflows import check_finite

    model = SimpleNamespace(path="m")
    check_finite("w", torch.full((4, 4), 3e38), model)  # its fp32 sum overflows; every value is finite
    check_finite("w", torch.full((300, 300), 60000.0, dtype=torch.float16), model)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for bad in (float("nan"), float("inf"), float("-inf")):
            tensor = torch.zeros(64, 8, dtype=dtype)
            tensor[17, 3] = bad
            with pytest.raises(InfoptError, match="holds 1 non-finite"):
                check_finite("w", tensor, model)
    pair = torch.zeros(8)
    pair[0], pair[1] = float("inf"), float("-inf")  # their sum is NaN, not a cancellation to a finite value
    with pytest.raises(InfoptError, match="holds 2 non-finite"):
        check_finite("w", pair, model)
