"""Block-wise recovery (--recover): learned rounding and group parameters on the sequential driver."""

import json

import numpy as np
import pytest
import torch

from infopt.errors import InfoptError
from infopt.models.loading import load_causal_lm
from infopt.quant.methods import build_config
from infopt.quant.recovery import A_MAX, A_MIN, RecoveryConfig, _Learned
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import Storage
from infopt.workflows import make_request, quantize, work_dir_for
from tests.conftest import run_cli
from tests.tiny_models import ARCH_CONFIGS, copy_tokenizer, make_tiny_model

FAST = RecoveryConfig(steps=12, batch=4)


def _windows(count=8, seq=32, vocab=256, seed=0):
    return torch.randint(3, vocab, (count, seq), generator=torch.Generator().manual_seed(seed))


def _request(src, out, method="gptq", recovery=FAST, **options):
    options = {"bits": 2, "group_size": 16, "symmetric": False, "name": "artifact", **options}
    if recovery is None and method == "rtn":  # calibration-free
        return make_request(model=str(src), out=out, method=method, **options)
    options.setdefault("calibration", _calibration(0))
    return make_request(model=str(src), out=out, method=method, windows=_windows(), recovery=recovery, **options)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama")


def test_learned_parameters_stay_in_their_ranges():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=g)
    spec = QuantSpec(2, 16, False)
    storage = Storage(min_zero_offset=1)
    base = quantize_rtn(weight, spec, storage)
    learned = _Learned("m", "m.weight", base, weight, storage, RecoveryConfig(), torch.device("cpu"))
    assert torch.equal(learned.rounded().codes, base.codes) and torch.equal(learned.rounded().zero, base.zero)
    for step in range(30):  # steps far larger than any learning rate allows
        loss = (learned.fake() - 3 * torch.randn(16, 64, generator=g)).pow(2).sum()
        loss.backward()
        with torch.no_grad():
            for t in learned.tensors():
                t.sub_(5 * torch.sign(t.grad))
                t.grad = None
            learned.clamp_()
    assert learned.v.abs().max() <= 0.5 and learned.v.abs().max() == 0.5
    for factor in (learned.lo, learned.hi):
        assert A_MIN <= factor.min() and factor.max() <= A_MAX and factor.min() < factor.max()
    q = learned.rounded()
    assert spec.qmin <= int(q.codes.min()) and int(q.codes.max()) <= spec.qmax
    assert spec.qmin + 1 <= int(q.zero.min()) and int(q.zero.max()) <= spec.qmax  # the format's lowest zero
    assert q.scale.dtype == base.scale.dtype
    # the weights the layer learned with are exactly the ones rounded at the end
    assert torch.allclose(learned.fake().detach(), q.dequantize(), atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_recovery_lowers_every_layers_output_error_for_every_architecture(tmp_path, arch):
    src = make_tiny_model(arch, tmp_path / "src")
    report = quantize(_request(src, tmp_path / "q", method="rtn", recovery=RecoveryConfig(steps=25, batch=4)))
    layers = report["recovery"]["layers"]
    assert len(layers) == 2
    for entry in layers:
        # learning really lowers the error (2-bit RTN leaves much to recover), and the kept result is never worse
        assert entry["loss_after"] < 0.95 * entry["loss_before"], (arch, entry)
        assert entry["kept"] == "recovered" and entry["best_step"] > 0
        assert entry["loss_after"] <= entry["loss_last"]  # the best scored checkpoint is the one kept


def _layer0_error(src, out, windows):
    """The first decoder layer's relative output error, recomputed from the written checkpoint (both models
    see the same embeddings there), as the recovery phase measures it."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    quantized = load_causal_lm(str(out))
    outputs = []
    for model in (full, quantized):
        captured = []
        layer = model.model.layers[0]
        handle = layer.register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model(windows)
        handle.remove()
        outputs.append(captured[0])
    return float((outputs[1] - outputs[0]).pow(2).sum() / outputs[0].pow(2).sum())


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_reported_errors_are_the_written_checkpoints_and_beat_the_base_method(tiny_llama, tmp_path, method):
    base = quantize(_request(tiny_llama, tmp_path / "base", method=method, recovery=None))
    report = quantize(_request(tiny_llama, tmp_path / "rec", method=method))
    first = report["recovery"]["layers"][0]
    # recovery scores under bf16 autocast where bf16 is native (--recover-dtype auto): agreement to ~1e-3
    got = _layer0_error(tiny_llama, tmp_path / "rec", _windows())
    assert got == pytest.approx(first["loss_after"], rel=5e-3)
    base_error = _layer0_error(tiny_llama, tmp_path / "base", _windows())
    assert got < 0.9 * base_error
    # the starting point is the base method's result: its error is the one recovery starts from
    assert first["loss_before"] == pytest.approx(base_error, rel=5e-3)
    assert set(report["errors"]) == set(base["errors"])
    card = (tmp_path / "rec" / "README.md").read_text()
    assert "## Block-wise recovery" in card and "| model.layers.1 |" in card and "recovery | block-wise" in card


def test_same_seed_gives_identical_bytes_and_resume_too(tiny_llama, tmp_path, monkeypatch):
    import infopt.quant.recovery as recovery

    quantize(_request(tiny_llama, tmp_path / "a", method="gptq"))
    quantize(_request(tiny_llama, tmp_path / "b", method="gptq"))
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")

    calls = []
    real = recovery.Recovery._learn

    def interrupted(self, ctx, *args):
        if ctx.index == 1:
            raise KeyboardInterrupt
        calls.append(ctx.index)
        return real(self, ctx, *args)

    monkeypatch.setattr(recovery.Recovery, "_learn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(_request(tiny_llama, tmp_path / "c", method="gptq"))
    assert work_dir_for(tmp_path / "c").is_dir() and not (tmp_path / "c").exists()
    monkeypatch.setattr(recovery.Recovery, "_learn", real)
    report = quantize(_request(tiny_llama, tmp_path / "c", method="gptq", resume=True))
    assert report["resumed_layers"] == 1 and calls == [0]
    assert files(tmp_path / "a") == files(tmp_path / "c")
    # another seed draws other batches: other bytes
    quantize(_request(tiny_llama, tmp_path / "e", method="gptq", calibration=_calibration(seed=5)))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "e" / "model.safetensors").read_bytes()


def _calibration(seed):
    from infopt.workflows import CalibrationData

    return CalibrationData(dataset="unused: windows are given", samples=8, seq_len=32, seed=seed)


def test_recipe_records_the_recovery_and_remakes_the_same_bytes(tiny_llama, tmp_path, stories_hf):
    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "src", vocab_size=512))
    args = ["quantize", str(src), "--method", "gptq", "--bits", "3", "--group-size", "32", "--calib", "tinystories",
            "--calib-samples", "8", "--calib-seq-len", "32", "--recover", "--recover-steps", "10",
            "--recover-optimizer", "adam"]
    done = run_cli(*args, "--out", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert "block-wise recovery: 10 steps" in done.stdout and "model.layers.1" in done.stdout
    recipe = (tmp_path / "a" / "infopt-recipe.yaml").read_text()
    assert "recover:" in recipe and "optimizer: adam" in recipe and "steps: 10" in recipe
    done = run_cli("quantize", "--recipe", str(tmp_path / "a" / "infopt-recipe.yaml"), "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    for p in sorted((tmp_path / "a").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def _hf_logits(path, ids, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_every_folder_format_loads_in_transformers_with_our_logits(tmp_path, fmt):
    if fmt != "compressed-tensors":
        pytest.importorskip("gptqmodel", reason="GPTQ/AWQ loaders not installed (pip install gptqmodel==7.6.0)")
    import transformers

    src = make_tiny_model("llama", tmp_path / "src", dtype=torch.float16, hidden_size=128, intermediate_size=256)
    report = quantize(_request(src, tmp_path / "q", method="rtn", bits=4, group_size=32, fmt=fmt))
    assert all(e["kept"] == "recovered" for e in report["recovery"]["layers"])
    with torch.no_grad():
        ours = load_causal_lm(str(tmp_path / "q"))(IDS).logits.float()
    extra = {}
    if fmt == "gptq":
        extra["quantization_config"] = transformers.GPTQConfig(bits=4, backend="gptq_torch")
    elif fmt == "awq":
        extra["quantization_config"] = transformers.AwqConfig(bits=4, backend="torch_awq")
    theirs = _hf_logits(tmp_path / "q", IDS, **extra)
    assert (theirs - ours).abs().max() <= 2e-3 * ours.abs().max()
    base = quantize(_request(src, tmp_path / "base", method="rtn", bits=4, group_size=32, fmt=fmt, recovery=None))
    with torch.no_grad():
        assert not torch.allclose(load_causal_lm(str(tmp_path / "base"))(IDS).logits.float(), ours, atol=1e-4)
    assert base["format"] == fmt


def test_gguf_gets_the_recovered_grid_and_llama_cpp_agrees(stories_hf, tmp_path):
    from tests.test_gguf import _llama_cpp_logits, _our_logits

    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "src", vocab_size=512))
    done = run_cli("quantize", str(src), "--method", "rtn", "--calib", "tinystories", "--calib-samples", "8",
                   "--calib-seq-len", "32", "--recover", "--recover-steps", "10", "--format", "gguf",
                   "--gguf-type", "Q4_0", "--group-size", "32", "--out", str(tmp_path / "r.gguf"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [e["kept"] for e in report["recovery"]["layers"]] == ["recovered", "recovered"]
    assert "stored exactly | 14 of 14" in (tmp_path / "r.gguf.md").read_text()
    assert "## Block-wise recovery" in (tmp_path / "r.gguf.md").read_text()
    tokens = [1, 403, 407, 261, 378]
    theirs, ours = _llama_cpp_logits(tmp_path / "r.gguf", tokens), _our_logits(tmp_path / "r.gguf", tokens)
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()


def test_bad_options_get_one_line_errors(stories_hf, tmp_path):
    base = ["quantize", str(stories_hf), "--out", str(tmp_path / "x"), "--calib", "tinystories"]
    cases = [
        (["--method", "gptq", "--recover", "--recover-steps", "0"], "invalid --recover-steps 0: at least 1"),
        (["--method", "gptq", "--recover", "--recover-lr", "-0.1"], "invalid --recover-lr -0.1"),
        (["--method", "gptq", "--recover", "--recover-optimizer", "sgd"], "invalid --recover-optimizer"),
        (["--method", "nf4", "--recover"], "--recover starts from rtn, gptq, awq"),
        (["--method", "hqq", "--recover"], "--recover starts from rtn, gptq, awq"),
        (["--method", "gptq", "--recover-steps", "5"], "add --recover"),
        (["--method", "gptq", "--recover", "--format", "gguf", "--gguf-type", "Q4_K_M", "--group-size", "32"],
         "K-quant grid"),
    ]
    for args, message in cases:
        out = tmp_path / ("x.gguf" if "gguf" in args else "x")
        done = run_cli(*[a if a != str(tmp_path / "x") else str(out) for a in base], *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and not out.exists()
    done = run_cli("quantize", str(stories_hf), "--out", str(tmp_path / "x"), "--recover")
    assert done.returncode == 2 and "--recover needs calibration text" in done.stderr
    with pytest.raises(InfoptError, match="recover-batch"):
        build_config(RecoveryConfig, {"batch": 0})


def test_layer_target_and_adam_learn_too_and_offload_changes_nothing(tiny_llama, tmp_path):
    layer = quantize(_request(tiny_llama, tmp_path / "l", recovery=RecoveryConfig(steps=12, batch=4, target="layer",
                                                                                  optimizer="adam")))
    model = quantize(_request(tiny_llama, tmp_path / "m", recovery=RecoveryConfig(steps=12, batch=4,
                                                                                  optimizer="adam")))
    for entry in layer["recovery"]["layers"]:
        assert entry["loss_after"] < entry["loss_before"]
    # layer 0 sees the same inputs either way; layer 1's model target also holds layer 0's error
    first_l, first_m = layer["recovery"]["layers"][0], model["recovery"]["layers"][0]
    assert first_l["loss_before"] == pytest.approx(first_m["loss_before"], rel=1e-6)
    assert model["recovery"]["layers"][1]["loss_before"] > layer["recovery"]["layers"][1]["loss_before"]
    offloaded = quantize(_request(tiny_llama, tmp_path / "o", recovery=RecoveryConfig(steps=12, batch=4,
                                                                                      optimizer="adam"),
                                  offload_activations=True))
    assert offloaded["recovery"]["layers"] == [dict(e, seconds=o["seconds"]) for e, o in
                                               zip(model["recovery"]["layers"], offloaded["recovery"]["layers"])]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "o" / "model.safetensors").read_bytes()


def test_methods_lists_the_recovery_options_and_where_it_starts():
    done = run_cli("methods", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert {n for n, m in listing.items() if m.get("recoverable")} == {"rtn", "gptq", "awq"}
    options = listing["recover"]["options"]
    assert options["steps"]["flag"] == "--recover-steps" and options["steps"]["default"] == 200
    assert options["optimizer"]["default"] == "sign" and options["batch"]["default"] == 8
    table = run_cli("methods")
    assert table.returncode == 0 and "--recover-steps" in table.stdout
