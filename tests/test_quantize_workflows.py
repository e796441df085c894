"""`infopt quantize` end to end for each method and format: the real loaders read what we write."""

import json
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel 7.6 reads this at import

import pytest  # noqa: E402
import torch  # noqa: E402

from infopt.errors import InfoptError  # noqa: E402
from infopt.formats.safetensors_io import load_tensors, weight_files  # noqa: E402
from infopt.models.loading import load_causal_lm  # noqa: E402
from infopt.quant.spec import QuantSpec  # noqa: E402
from infopt.workflows import CalibrationData, make_request, quantize  # noqa: E402
from tests.tiny_models import copy_tokenizer, make_tiny_model  # noqa: E402

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stories_hf):
    """A random Llama with shapes every packed format accepts, and stories260K's tokenizer."""
    path = make_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama", vocab_size=512, hidden_size=128,
                           intermediate_size=256)
    return copy_tokenizer(stories_hf, path)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _close(got, want, rel):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_gptq_method_to_gptq_format_loads_in_transformers(tiny, tmp_path, act_order):
    pytest.importorskip("gptqmodel", reason="pip install gptqmodel==7.6.0 optimum")
    pytest.importorskip("optimum.gptq", reason="pip install optimum")
    import torch._dynamo
    import transformers

    out = tmp_path / "q"
    report = quantize(make_request(model=str(tiny), spec=QuantSpec(4, 32, False), out=out, method="gptq",
                                      fmt="gptq", calibration=CalibrationData(dataset="tinystories", samples=8, seq_len=64),
                                      act_order=act_order))
    qconfig = json.loads((out / "quantize_config.json").read_text())
    assert qconfig["desc_act"] is act_order and qconfig["sym"] is False and qconfig["group_size"] == 32
    g_idx = load_tensors(weight_files(out))["model.layers.0.mlp.down_proj.g_idx"]
    plain = torch.arange(256, dtype=torch.int32) // 32
    assert torch.equal(g_idx, plain) is not act_order
    assert report["quantized"] and not report["skipped"]
    ours = _logits(load_causal_lm(str(out)))
    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True  # gptqmodel's torch kernel would compile itself on load
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32, quantization_config=transformers.GPTQConfig(bits=4, backend="gptq_torch"))
        theirs = _logits(hf)
    finally:
        torch._dynamo.config.disable = before
    _close(theirs, ours, 1e-3)
    _close(ours, _logits(load_causal_lm(str(tiny))), 0.5)  # quantized, yet still the same model


def test_nf4_method_writes_bitsandbytes_checkpoint_transformers_loads(tiny, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes")
    import transformers

    out = tmp_path / "q"
    report = quantize(make_request(model=str(tiny), out=out, method="nf4", double_quant=True,
                                      ignore=[r"layers\.1\.mlp\.down_proj"]))
    assert report["format"] == "bnb" and report["spec"] == "nf4 block 64 double-quant"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] and config["bnb_4bit_quant_type"] == "nf4"
    assert "model.layers.1.mlp.down_proj" in config["llm_int8_skip_modules"]
    # identical to bitsandbytes quantizing the same source weight
    source = load_tensors(weight_files(tiny))["model.layers.0.self_attn.q_proj.weight"]
    packed, state = bnb.functional.quantize_4bit(source, blocksize=64, quant_type="nf4", compress_statistics=True)
    written = load_tensors(weight_files(out))
    assert torch.equal(written["model.layers.0.self_attn.q_proj.weight"], packed)
    assert torch.equal(written["model.layers.0.self_attn.q_proj.weight.absmax"], state.absmax)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32)
    for module in hf.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # its fused CPU path computes in bf16
    _close(_logits(hf), _logits(load_causal_lm(str(out))), 1e-3)


@pytest.mark.parametrize("changes,words", [
    (dict(method="rtn", act_order=True), "act_order: not an option of method rtn"),
    (dict(method="rtn", calibration=CalibrationData(dataset="tinystories")), "needs no calibration"),
    (dict(method="rtn", double_quant=True), "double_quant: not an option of method rtn"),
    (dict(method="nf4", fmt="gptq"), "not those of --method nf4"),
    (dict(method="gptq", fmt="bnb", calibration=CalibrationData(dataset="tinystories")), "not those of --method gptq"),
    (dict(method="nf4", overrides=["down_proj=8"]), "only REGEX=skip"),
    (dict(method="rtn", fmt="gptq", overrides=["down_proj=8"]), "one scheme"),
    (dict(method="rtn", fmt="gptq", include_lm_head=True), "lm_head"),
])
def test_options_a_method_or_format_cannot_honour_are_refused_before_any_work(tiny, tmp_path, changes, words):
    args = dict(model=str(tiny), out=tmp_path / "q")
    if changes["method"] != "nf4":
        args["spec"] = QuantSpec(4, 32, False)
    args.update(changes)
    with pytest.raises(InfoptError, match=words):
        quantize(make_request(**args))
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


def test_awq_method_to_awq_format_loads_in_transformers(tiny, tmp_path):
    pytest.importorskip("gptqmodel", reason="pip install gptqmodel==7.6.0")
    import torch._dynamo
    import transformers

    out = tmp_path / "q"
    report = quantize(make_request(model=str(tiny), spec=QuantSpec(4, 64, False), out=out, method="awq",
                                      fmt="awq", calibration=CalibrationData(dataset="tinystories", samples=8, seq_len=64),
                                      grid=5, clip_grid=10))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm" and config["zero_point"]
    assert report["quantized"] and all(e["module"].endswith(("k_proj", "v_proj")) for e in report["skipped"])
    ours = _logits(load_causal_lm(str(out)))
    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float16, quantization_config=transformers.AwqConfig(bits=4, backend="torch_awq"))
        theirs = _logits(hf)
    finally:
        torch._dynamo.config.disable = before
    _close(theirs, ours, 2e-3)
