"""Our compressed-tensors output, checked by compressed-tensors itself and by transformers."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig

from infopt.formats import registry
from infopt.formats.safetensors_io import load_tensors, weight_files
from infopt.models.loading import load_causal_lm
from infopt.quant.spec import QuantSpec
from infopt.workflows import make_request, quantize
from tests.tiny_models import make_tiny_model

SPECS = [QuantSpec(4, 32, True), QuantSpec(4, -1, False), QuantSpec(8, -1, True), QuantSpec(8, 64, False),
         QuantSpec(2, 32, False), QuantSpec(3, 64, True)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama")


def _write(src, out, spec, **kw):
    return quantize(make_request(model=str(src), spec=spec, out=out, **kw))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_compressed_tensors_decompressor_reproduces_our_reader(tiny_llama, tmp_path, spec):
    out = tmp_path / "q"
    _write(tiny_llama, out, spec)
    config = json.loads((out / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = qconfig.config_groups["group_0"]
    tensors = load_tensors(weight_files(out))
    quantized, _ = registry.read_quantized(weight_files(out), config)
    assert len(quantized) == 2 * 7
    for name, q in quantized.items():
        module = name.removesuffix(".weight")
        state = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".weight_")}
        theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert theirs.dtype == q.dequantize().dtype
        assert torch.equal(theirs, q.dequantize()), name


def _hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(8, -1, False)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_transformers_loads_output_and_logits_match_reader(tiny_llama, tmp_path, spec):
    out = tmp_path / "q"
    _write(tiny_llama, out, spec)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = load_causal_lm(str(out))
    with torch.no_grad():
        expected = ours(ids).logits
    got = _hf_logits(out, ids)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # and quantization really happened: the logits differ from the source model's
    assert not torch.allclose(_hf_logits(tiny_llama, ids), expected, atol=1e-6)


def test_mixed_schemes_write_one_group_per_scheme_and_load(tiny_llama, tmp_path):
    out = tmp_path / "q"
    spec = QuantSpec(4, 32, True)
    report = _write(tiny_llama, out, spec, overrides=[r"mlp\.down_proj$=8:-1:asym"],
                    ignore=[r"layers\.1\.self_attn\.o_proj"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2
    assert "model.layers.1.self_attn.o_proj" in config["ignore"] and "lm_head" in config["ignore"]
    assert {e["module"] for e in report["skipped"]} == {"model.layers.1.self_attn.o_proj"}
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    ours = load_causal_lm(str(out))
    with torch.no_grad():
        expected = ours(ids).logits
    assert torch.allclose(_hf_logits(out, ids), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    down = registry.read_quantized(weight_files(out), json.loads((out / "config.json").read_text()))[0]
    assert down["model.layers.0.mlp.down_proj.weight"].spec == QuantSpec(8, -1, False)


def test_sharded_output_with_index_loads(tiny_llama, tmp_path):
    out = tmp_path / "q"
    report = _write(tiny_llama, out, QuantSpec(4, 32), max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in report["files"] and len(report["files"]) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in report["files"] if f.endswith(".safetensors")}
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = load_causal_lm(str(out))(ids).logits
    assert torch.allclose(_hf_logits(out, ids), expected, rtol=1e-4, atol=1e-5)


def test_fp16_source_keeps_fp16_scales(tmp_path):
    src = make_tiny_model("llama", tmp_path / "src", dtype=torch.float16)
    out = tmp_path / "q"
    _write(src, out, QuantSpec(4, 32))
    tensors = load_tensors(weight_files(out))
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float16
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert tensors["model.norm.weight"].dtype == torch.float16


def test_output_is_byte_identical_across_runs_and_has_card_and_manifest(tiny_llama, tmp_path):
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    a, b = tmp_path / "1" / "q", tmp_path / "2" / "q"
    _write(tiny_llama, a, QuantSpec(4, 32, False))
    _write(tiny_llama, b, QuantSpec(4, 32, False))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"README.md", "infopt-manifest.json", "config.json", "model.safetensors"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    manifest = json.loads((a / "infopt-manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"infopt-manifest.json"}
    card = (a / "README.md").read_text()
    assert "int4 g32 asym" in card and "rtn" in card
