"""Our bitsandbytes checkpoints, checked against Linear4bit's own state dict and loaded by transformers."""

import copy
import json
import math

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.utils import unpack_tensor_to_dict
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig

from infopt.errors import InfoptError
from infopt.formats import bnb as fmt
from infopt.formats import registry
from infopt.formats.safetensors_io import ShardedWriter, load_tensors, weight_files
from infopt.models.loading import load_causal_lm
from infopt.quant import nf4
from tests.tiny_models import make_tiny_model

# (in, out, bias): out_features multiples of 32, which bitsandbytes' fused CPU kernel needs
LAYERS = [(96, 64, True), (64, 128, False), (128, 32, True)]


def _bnb_layers(dense, quant_type, double_quant, dtype, storage=torch.uint8):
    """Linear4bit copies of the dense linears, quantized in memory by bitsandbytes itself."""
    modules = {}
    for name, linear in dense.items():
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                   compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type,
                                   quant_storage=storage).to(dtype)
        module.load_state_dict(linear.state_dict())
        modules[name] = module.to("cpu")  # quantization happens on the move to a device
    return modules


def _dense_layers(dtype, seed=0):
    torch.manual_seed(seed)
    return {f"layers.{i}.proj": torch.nn.Linear(in_f, out_f, bias, dtype=dtype)
            for i, (in_f, out_f, bias) in enumerate(LAYERS)}


def _write_ours(dense, out_dir, quant_type, double_quant, storage=torch.uint8):
    def items():
        for name, linear in dense.items():
            yield f"{name}.weight", nf4.quantize_4bit(linear.weight.data, quant_type, 64, double_quant, storage)
            if linear.bias is not None:
                yield f"{name}.bias", linear.bias.data

    writer = ShardedWriter(out_dir)
    schemes = fmt.write_weights(writer, items())
    writer.close()
    return schemes


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantization of the weight viewed as one row.

    Its AVX-512 CPU kernel assumes each row starts a block, wrong when in_features is not a multiple of the
    block (96 here); as a single row the same data is handled by it correctly.
    """
    flat = copy.copy(state)
    flat.shape = torch.Size([1, math.prod(state.shape)])
    return F.dequantize_4bit(packed, flat).reshape(state.shape)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
def test_writer_matches_linear4bit_state_dict(tmp_path, dtype, quant_type, double_quant, storage):
    dense = _dense_layers(dtype)
    theirs = {}
    for name, module in _bnb_layers(dense, quant_type, double_quant, dtype, storage).items():
        theirs.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    schemes = _write_ours(dense, tmp_path, quant_type, double_quant, storage)
    ours = load_tensors(weight_files(tmp_path))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(_raw(ours[key]), _raw(value)), key
        if "quant_state" in key:
            assert key.endswith(f".weight.quant_state.bitsandbytes__{quant_type}")
            assert json.loads(bytes(ours[key].tolist())) == unpack_tensor_to_dict(value)
    assert set(schemes) == set(dense)
    assert all(s == fmt.BnbScheme(quant_type, 64, double_quant, storage) for s in schemes.values())


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reader_reads_bitsandbytes_own_state_dict(tmp_path, quant_type, double_quant):
    """A checkpoint made by bitsandbytes (its in-memory state dict saved as is) comes back through our reader."""
    dense = _dense_layers(torch.float16, seed=1)
    modules = _bnb_layers(dense, quant_type, double_quant, torch.float16)
    state = {}
    for name, module in modules.items():
        state.update({f"{name}.{k}": v.contiguous() for k, v in module.state_dict().items()})
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {"quantization_config": fmt.quantization_config(quant_type, double_quant, torch.float16)}
    quantized, rest = registry.read_quantized(weight_files(tmp_path), config)
    assert sorted(quantized) == sorted(f"{name}.weight" for name in dense)
    assert sorted(rest) == sorted(f"{name}.bias" for name, lin in dense.items() if lin.bias is not None)
    for name, module in modules.items():
        weight = quantized[f"{name}.weight"]
        expected = _bnb_dequantize(module.weight.data, module.weight.quant_state)
        assert weight.shape == tuple(dense[name].weight.shape) and weight.dtype == torch.float16
        assert torch.equal(weight.dequantize(), expected)
        assert torch.equal(weight.dequantize(), nf4.quantize_4bit(dense[name].weight.data, quant_type, 64,
                                                                  double_quant).dequantize())


def test_reader_round_trips_every_field(tmp_path):
    torch.manual_seed(2)
    originals = {"a.weight": nf4.quantize_4bit(torch.randn(33, 65, dtype=torch.bfloat16), "fp4", 128, True),
                 "b.weight": nf4.quantize_4bit(torch.randn(64, 96), "nf4", 32, False, torch.float16)}
    writer = ShardedWriter(tmp_path)
    fmt.write_weights(writer, [*originals.items(), ("norm.weight", torch.ones(3))])
    writer.close()
    quantized, dense = fmt.read_quantized(weight_files(tmp_path), fmt.quantization_config("nf4", True))
    assert list(dense) == ["norm.weight"]
    for name, original in originals.items():
        read = quantized[name]
        assert (read.quant_type, read.blocksize, read.shape, read.dtype, read.offset, read.quant_storage) == (
            original.quant_type, original.blocksize, original.shape, original.dtype, original.offset,
            original.quant_storage)
        assert torch.equal(_raw(read.packed), _raw(original.packed)) and torch.equal(read.absmax, original.absmax)
        assert torch.equal(read.dequantize(), original.dequantize())


def test_quantization_config_is_what_transformers_writes():
    ours = fmt.quantization_config("nf4", True, torch.bfloat16, torch.uint8, ["model.layers.1.mlp.down_proj"])
    theirs = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8,
                                llm_int8_skip_modules=["lm_head", "model.layers.1.mlp.down_proj"]).to_dict()
    assert ours == theirs
    assert BitsAndBytesConfig.from_dict(ours).to_dict() == theirs
    assert fmt.quantization_config("fp4", False, "float16")["llm_int8_skip_modules"] == ["lm_head"]


def test_reader_errors(tmp_path):
    weight = nf4.quantize_4bit(torch.randn(32, 64), "nf4", 64, True)
    tensors = fmt.weight_tensors("m", weight)
    del tensors["m.weight.nested_quant_map"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    config = fmt.quantization_config("nf4", True)
    with pytest.raises(InfoptError, match="missing m.weight.nested_quant_map"):
        fmt.read_quantized(weight_files(tmp_path), config)
    tensors = fmt.weight_tensors("m", weight)
    tensors["m.weight.absmax"] = tensors["m.weight.absmax"][:-1].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InfoptError, match="absmax values"):
        fmt.read_quantized(weight_files(tmp_path), config)
    with pytest.raises(InfoptError, match="8-bit"):
        fmt.read_quantized(weight_files(tmp_path), {**config, "load_in_8bit": True, "load_in_4bit": False})


def _write_tiny_llama(src, out, quant_type, double_quant, dtype):
    state = load_tensors(weight_files(src))
    quantize = {name for name in state if name.endswith("_proj.weight") and "layers.1.mlp.down_proj" not in name}

    def items():
        for name, tensor in state.items():
            yield name, nf4.quantize_4bit(tensor, quant_type, 64, double_quant) if name in quantize else tensor

    out.mkdir()
    writer = ShardedWriter(out)
    fmt.write_weights(writer, items())
    writer.close()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = fmt.quantization_config(quant_type, double_quant, dtype,
                                                            skip_modules=["model.layers.1.mlp.down_proj"])
    (out / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("quant_type,double_quant,dtype", [("nf4", True, torch.float32), ("fp4", False, torch.float16)],
                         ids=["nf4-double-fp32", "fp4-plain-fp16"])
def test_transformers_loads_our_checkpoint_and_logits_match_reader(tmp_path, quant_type, double_quant, dtype):
    from transformers import AutoModelForCausalLM

    src = make_tiny_model("llama", tmp_path / "src", dtype=dtype)
    out = tmp_path / "q"
    _write_tiny_llama(src, out, quant_type, double_quant, dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32)
    linears = {n: m for n, m in hf.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linears) == 2 * 7 - 1 and "model.layers.1.mlp.down_proj" not in linears
    ours = load_causal_lm(str(out), dtype=torch.float32)
    reader, _ = registry.read_quantized(weight_files(out), json.loads((out / "config.json").read_text()))
    for name, module in linears.items():
        theirs = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(theirs, reader[f"{name}.weight"].dequantize()), name
        # bitsandbytes' fused AVX512-BF16 CPU matmul runs in bf16; use its dequantize + fp32 matmul path instead
        module.support_avx512bf16_for_cpu = False
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids).logits
    assert ((theirs - mine).abs().max() / mine.abs().max()).item() < 1e-3
