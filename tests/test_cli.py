"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, no debris."""

import json
import shutil

import pytest
import torch

from tests.conftest import KNOWN_STORY, run_cli
from tests.tiny_models import make_tiny_model


def assert_clean_failure(result, words, code=2, leftover_parent=None):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert words.lower() in lines[0].lower(), lines[0]
    if leftover_parent is not None:
        assert [p.name for p in leftover_parent.iterdir() if ".tmp-" in p.name] == []


@pytest.fixture
def broken_models(tmp_path, stories_hf):
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated"
    shutil.copytree(stories_hf, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(stories_hf, corrupt)
    header_len = int.from_bytes(data[:8], "little")
    (corrupt / "model.safetensors").write_bytes(data[:8] + b"{" + b"\xff" * (header_len - 1) + data[8 + header_len :])
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    return {"empty": empty, "truncated": truncated, "corrupt": corrupt, "gpt2": gpt2}


@pytest.mark.parametrize("case,words", [
    ("missing", "no such file"),
    ("hubmiss", "cannot be reached"),
    ("empty", "no config.json"),
    ("truncated", "truncated"),
    ("corrupt", "not valid JSON"),
    ("gpt2", "unsupported architecture 'gpt2'"),
])
def test_bad_models_fail_cleanly(case, words, broken_models, tmp_path):
    source = {"missing": str(tmp_path / "nope"), "hubmiss": "no-such-org/no-such-model"}.get(case) or str(broken_models[case])
    out = tmp_path / "out"
    result = run_cli("quantize", source, "--bits", "4", "--group-size", "32", "--out", str(out))
    assert_clean_failure(result, words, leftover_parent=tmp_path)
    assert not out.exists()


@pytest.mark.parametrize("args,words", [
    (["--bits", "5"], "invalid --bits 5"),
    (["--group-size", "0"], "invalid group size 0"),
    (["--override", "bad"], "invalid override"),
    (["--method", "awq2"], "not available"),
    (["--method", "gptq", "--group-size", "-1"], "needs calibration text"),
    (["--method", "gptq", "--group-size", "-1", "--calib", "tinystories", "--device", "cuda"], "no CUDA device"),
    (["--method", "gptq", "--group-size", "-1", "--calib", "tinystories", "--damp", "2"], "invalid --damp"),
    (["--method", "gptq", "--group-size", "-1", "--calib", "nope.txt"], "nope.txt"),
    (["--format", "exl2"], "not available"),
    (["--format", "gguf"], "named *.gguf"),
    (["--method", "gptq", "--group-size", "-1", "--calib", "tinystories", "--forward-dtype", "half"],
     "invalid --forward-dtype"),
    (["--bits", "8", "--group-size", "-1", "--forward-dtype", "bfloat16"], "does not apply to --method rtn"),
    (["--method", "nf4", "--bits", "4"], "--bits 4 does not apply to --method nf4"),
    (["--method", "awq", "--calib", "tinystories", "--damp", "0.1"], "--damp 0.1 does not apply to --method awq"),
    (["--calib-samples", "4"], "--method rtn needs no calibration"),
])
def test_bad_options_fail_cleanly(args, words, stories_hf, tmp_path):
    out = tmp_path / "out"
    result = run_cli("quantize", str(stories_hf), *args, "--out", str(out))
    assert_clean_failure(result, words, leftover_parent=tmp_path)
    assert not out.exists()


def test_existing_output_needs_force_and_force_replaces(stories_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("quantize", str(stories_hf), "--bits", "8", "--group-size", "-1", "--out", str(out))
    assert_clean_failure(result, "already exists")
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only an earlier infopt output, never a folder of the user's
    refused = run_cli("quantize", str(stories_hf), "--bits", "8", "--group-size", "-1", "--out", str(out), "--force")
    assert_clean_failure(refused, "is not an infopt output")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    out.rmdir()
    first = run_cli("quantize", str(stories_hf), "--bits", "4", "--group-size", "-1", "--out", str(out))
    assert first.returncode == 0, first.stderr
    forced = run_cli("quantize", str(stories_hf), "--bits", "8", "--group-size", "-1", "--out", str(out), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # nor does an output ever overlap the source
    inside = run_cli("quantize", str(stories_hf), "--out", str(stories_hf / "q"))
    assert_clean_failure(inside, "overlaps the source model")
    assert not (stories_hf / "q").exists()


def test_dry_run_prints_plan_and_writes_nothing(stories_hf, tmp_path):
    out = tmp_path / "out"
    result = run_cli("quantize", str(stories_hf), "--bits", "4", "--group-size", "32", "--dry-run", "--json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert not out.exists()
    skipped = {e["module"] for e in plan["skipped"]}
    assert skipped == {f"model.layers.{i}.mlp.down_proj" for i in range(5)}  # 172 inputs, group 32
    assert len(plan["quantized"]) == 30 and len(plan["warnings"]) == 5
    assert plan["expected_linear_bytes"] < plan["source_linear_bytes"]
    text = run_cli("quantize", str(stories_hf), "--bits", "4", "--group-size", "32", "--dry-run")
    assert text.returncode == 0 and "down_proj" in text.stdout and "not divisible" in text.stderr


def test_pickle_weights_refused_unless_allowed(tmp_path):
    src = tmp_path / "pickled"
    make_tiny_model("llama", tmp_path / "safe")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "safe"))
    src.mkdir()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    shutil.copy(tmp_path / "safe" / "config.json", src / "config.json")
    result = run_cli("quantize", str(src), "--group-size", "32", "--out", str(tmp_path / "q"))
    assert_clean_failure(result, "--allow-pickle")
    allowed = run_cli("quantize", str(src), "--group-size", "32", "--out", str(tmp_path / "q"), "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_eval_json_gate_and_short_dataset(stories_hf, tmp_path):
    q = tmp_path / "int4"
    made = run_cli("quantize", str(stories_hf), "--bits", "4", "--group-size", "-1", "--asym", "--out", str(q))
    assert made.returncode == 0, made.stderr
    common = ["--dataset", "tinystories", "--baseline", str(stories_hf), "--max-windows", "20", "--json"]
    passed = run_cli("eval", str(q), *common, "--max-ppl-delta", "0.5")
    assert passed.returncode == 0, passed.stderr
    report = json.loads(passed.stdout)
    assert {"ppl", "tokens", "windows", "seq_len", "baseline_ppl", "ppl_delta_rel", "kl_mean", "top1_agreement"} <= set(report)
    assert report["windows"] == 20 and report["seq_len"] == 512 and report["ppl_delta_rel"] > 0
    gated = run_cli("eval", str(q), *common, "--max-ppl-delta", "0.001")
    assert gated.returncode == 1 and "exceeds the limit" in gated.stderr and "Traceback" not in gated.stderr
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    result = run_cli("eval", str(stories_hf), "--dataset", str(short))
    assert_clean_failure(result, "dataset has")
    assert_clean_failure(run_cli("eval", str(stories_hf), "--dataset", str(tmp_path / "none.txt")), "dataset not found")


def test_eval_through_the_infopt_engine(stories_hf, tmp_path):
    from infopt.runtime import kernels
    from infopt.workflows import evaluate_checkpoint

    q = tmp_path / "int4"
    made = run_cli("quantize", str(stories_hf), "--bits", "4", "--group-size", "-1", "--asym", "--out", str(q))
    assert made.returncode == 0, made.stderr
    args = dict(dataset="tinystories", baseline=str(stories_hf), max_windows=6)
    hf = evaluate_checkpoint(str(q), **args)
    exact = evaluate_checkpoint(str(q), engine="infopt", kernels="ext", **args)
    assert hf["engine"] == "transformers" and exact["quantized_linears"] == {"ext": 5 * 4}
    for key in ("ppl", "baseline_ppl", "kl_mean"):  # same numbers, summed in another order
        assert abs(exact[key] / hf[key] - 1) < 1e-4, key
    assert exact["tokens"] == hf["tokens"] and abs(exact["top1_agreement"] - hf["top1_agreement"]) < 1e-3
    if kernels.has_vnni():
        a8 = evaluate_checkpoint(str(q), engine="infopt", kernels="ext-a8", **args)
        assert a8["quantized_linears"] == {"ext-a8": 5 * 4}
        assert a8["ppl"] != exact["ppl"] and abs(a8["ppl"] / exact["ppl"] - 1) < 0.01  # int8 activations cost little
    table = run_cli("eval", str(q), "--dataset", "tinystories", "--max-windows", "2", "--engine", "infopt")
    assert table.returncode == 0 and "20 linears on ext" in table.stdout, table.stderr
    assert_clean_failure(run_cli("eval", str(q), "--dataset", "tinystories", "--kernels", "ext-a8"),
                         "--kernels applies to --engine infopt")
    assert_clean_failure(run_cli("eval", str(q), "--dataset", "tinystories", "--engine", "bogus"), "invalid engine")
    gemma = make_tiny_model("gemma", tmp_path / "gemma")
    assert_clean_failure(run_cli("eval", str(gemma), "--dataset", "tinystories", "--engine", "infopt"),
                         "does not support")


def test_convert_and_run_from_the_command_line(data, tmp_path):
    folder = data / "tinyllamas-stories260K"
    out = tmp_path / "hf"
    converted = run_cli("convert", "llama2c", str(folder / "stories260K.bin"), "--tokenizer", str(folder / "tok512.model"), "--out", str(out))
    assert converted.returncode == 0, converted.stderr
    again = run_cli("convert", "llama2c", str(folder / "stories260K.bin"), "--out", str(out))
    assert_clean_failure(again, "already exists")
    result = run_cli("run", str(out), "--max-new-tokens", "64")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(KNOWN_STORY)
    sampled = run_cli("run", str(out), "--prompt", "Once upon a time", "--temperature", "0.8", "--top-k", "40",
                      "--top-p", "0.95", "--seed", "3", "--max-new-tokens", "20", "--json")
    assert sampled.returncode == 0, sampled.stderr
    data_out = json.loads(sampled.stdout)
    assert data_out["new_tokens"] == 20 and data_out["prompt"] == "Once upon a time"
