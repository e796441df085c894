"""End-to-end quantization-aware training (`infopt qat`)."""

import json

import pytest
import torch

from infopt.errors import InfoptError
from infopt.finetune import QATRequest, qat
from infopt.formats.registry import read_quantized
from infopt.models.loading import load_causal_lm, open_model
from infopt.quant.methods import build_config
from infopt.quant.qat import FACTOR_MAX, FACTOR_MIN, QATConfig, QATLinear
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec
from tests.conftest import run_cli

QUICK = dict(steps=8, eval_every=4, batch=2, seq_len=64, eval_windows=4)


def _request(src, out, **options):
    values = {**QUICK, **{k: v for k, v in options.items() if k in QATConfig.__dataclass_fields__}}
    rest = {k: v for k, v in options.items() if k not in QATConfig.__dataclass_fields__}
    rest.setdefault("spec", QuantSpec(2, 4, False))
    return QATRequest(model=str(src), data="tinystories", out=out, config=QATConfig(**values), **rest)


def test_the_start_is_exact_and_trained_parameters_stay_in_range():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 32, generator=g)
    start = quantize_rtn(weight, QuantSpec(2, 8, False))
    for train_weights in (False, True):
        module = QATLinear(start, weight, None, train_weights)
        assert torch.equal(module.export().codes, start.codes)
        assert torch.allclose(module.quantized_weight(), start.dequantize())
        with torch.no_grad():
            module.factor.fill_(100.0)
        module.clamp_()
        assert float(module.factor.max()) == FACTOR_MAX
        with torch.no_grad():
            module.factor.fill_(-1.0)
        module.clamp_()
        assert float(module.factor.min()) == FACTOR_MIN
        exported = module.export()
        assert exported.spec.qmin <= int(exported.codes.min()) and int(exported.codes.max()) <= exported.spec.qmax


def test_training_lowers_held_out_perplexity_and_writes_a_loadable_checkpoint(stories_hf, tmp_path):
    report = qat(_request(stories_hf, tmp_path / "q"))
    assert report["best_ppl"] < report["start_ppl"] and report["best_step"] > 0
    assert [h["step"] for h in report["history"]] == [0, 4, 8]
    model = open_model(str(tmp_path / "q"))
    quantized, _ = read_quantized(model.files, model.config)
    assert len(quantized) == report["quantized_linears"] == 35
    card = (tmp_path / "q" / "README.md").read_text()
    assert "end-to-end QAT" in card and "held-out" in card
    # the written checkpoint scores what the run measured at its best check
    from infopt.eval.perplexity import evaluate
    from infopt.calibration.sources import load_text
    from infopt.calibration.windows import tokenize
    from infopt.models.loading import load_tokenizer

    ids = tokenize(load_tokenizer(stories_hf), load_text("tinystories"))
    held_out = ids[int(ids.numel() * 0.9):]
    got = evaluate(load_causal_lm(str(tmp_path / "q")), held_out, 64, max_windows=4)["ppl"]
    assert got == pytest.approx(report["best_ppl"], rel=1e-3)


@pytest.mark.parametrize("train", ["scales", "all"])
def test_resume_gives_the_same_bytes(stories_hf, tmp_path, monkeypatch, train):
    import infopt.finetune as finetune

    qat(_request(stories_hf, tmp_path / "a", train=train, loss="ce"))
    real = finetune._save
    calls = []

    def interrupt_after_first_check(work, state, *args):
        real(work, state, *args)
        calls.append(state["step"])
        if state["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save", interrupt_after_first_check)
    with pytest.raises(KeyboardInterrupt):
        qat(_request(stories_hf, tmp_path / "b", train=train, loss="ce"))
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(finetune, "_save", real)
    qat(_request(stories_hf, tmp_path / "b", train=train, loss="ce", resume=True))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    card = lambda d: (d / "README.md").read_text().replace(f"# {d.name}\n", "")  # noqa: E731
    assert card(tmp_path / "a") == card(tmp_path / "b")


def test_starting_from_a_gptq_checkpoint_keeps_its_codes_in_scales_mode(stories_hf, tmp_path):
    done = run_cli("quantize", str(stories_hf), "--method", "gptq", "--bits", "3", "--group-size", "4", "--asym",
                   "--calib", "tinystories", "--calib-samples", "8", "--calib-seq-len", "64", "--format", "gptq",
                   "--out", str(tmp_path / "g"))
    assert done.returncode == 0, done.stderr
    report = qat(_request(stories_hf, tmp_path / "q", start=str(tmp_path / "g"), spec=QuantSpec(4, 128, False),
                          lr=1e-2, steps=20, eval_every=10, batch=4, seq_len=128))
    assert report["format"] == "gptq" and report["start"].startswith("gptq checkpoint")
    assert report["best_step"] > 0 and report["best_ppl"] < report["start_ppl"]
    start, trained = (read_quantized(open_model(str(p)).files, open_model(str(p)).config)[0]
                      for p in (tmp_path / "g", tmp_path / "q"))
    assert set(start) == set(trained)
    changed = 0
    for name, weight in start.items():
        assert torch.equal(trained[name].codes, weight.codes), name
        changed += not torch.equal(trained[name].scale, weight.scale)
    assert changed > 0  # the step sizes were trained


def test_early_stopping_keeps_the_best_check(stories_hf, tmp_path):
    report = qat(_request(stories_hf, tmp_path / "q", lr=1.0, steps=40, eval_every=2, patience=2))
    assert report["stopped"] and report["stopped"].startswith("early stop")
    assert report["history"][-1]["step"] < 40
    assert report["best_ppl"] == min(h["held_out_ppl"] for h in report["history"])


def test_bad_options_get_one_line_errors(stories_hf, tmp_path):
    base = ["qat", str(stories_hf), "--data", "tinystories", "--out", str(tmp_path / "x")]
    cases = [
        (["--steps", "0"], "invalid --steps 0: at least 1"),
        (["--lr", "-1"], "invalid --lr -1.0"),
        (["--train", "everything"], "invalid --train"),
        (["--start", str(stories_hf)], "not a quantized checkpoint"),
        (["--format", "gguf"], "qat writes compressed-tensors, gptq or awq"),
        (["--seq-len", "100000", "--group-size", "4", "--data", str(tmp_path / "tiny.txt")], "too few"),
        (["--start", str(stories_hf), "--bits", "2"], "describe the RTN start"),
        (["--start", str(tmp_path / "s.gguf")], "is on a GGUF block grid (Q4_1, Q5_x or a K-quant)"),
    ]
    (tmp_path / "tiny.txt").write_text("Once upon a time there was a cat.")
    made = run_cli("quantize", str(stories_hf), "--format", "gguf", "--gguf-type", "Q4_1", "--out",
                   str(tmp_path / "s.gguf"))
    assert made.returncode == 0, made.stderr
    for args, message in cases:
        done = run_cli(*base, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()
    with pytest.raises(InfoptError, match="weight-lr"):
        build_config(QATConfig, {"weight_lr": 0.0})
    done = run_cli(*base, "--steps", "2", "--eval-every", "1", "--seq-len", "32", "--eval-windows", "2", "--json",
                   "--group-size", "4")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["history"][0]["step"] == 0
    again = run_cli(*base, "--steps", "2", "--group-size", "4")
    assert again.returncode == 2 and "exists" in again.stderr  # no silent overwrite without --force
