"""AWQ GEMM checkpoints: exact bit layout, round trips, and loading by transformers and GPTQModel."""

import json
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel 7.6 reads this at import

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from infopt.errors import InfoptError  # noqa: E402
from infopt.formats import artifact, awq, registry  # noqa: E402
from infopt.formats.safetensors_io import ShardedWriter, load_tensors, weight_files  # noqa: E402
from infopt.models.loading import load_causal_lm  # noqa: E402
from infopt.quant.rtn import quantize_rtn  # noqa: E402
from infopt.quant.weights import QuantizedWeight  # noqa: E402
from infopt.quant.spec import QuantSpec  # noqa: E402
from tests.test_gptq_format import TINY_GPTQ, _act_order, _close, _save_tokenizer  # noqa: E402

# we pass AwqConfig(backend=...) to pick the kernel; transformers warns that the rest is ignored
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
MODULE = "model.layers.0.mlp.up_proj"


class _Collect:
    """Stands in for ShardedWriter: keeps what write_weights adds."""

    def __init__(self):
        self.tensors = {}

    def add(self, name, tensor):
        self.tensors[name] = tensor


def _pack(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    collect = _Collect()
    awq.write_weights(collect, [(f"{MODULE}.weight", q)])
    return collect.tensors


def _write(tmp_path, items, dense=()):
    writer = ShardedWriter(tmp_path)
    specs = awq.write_weights(writer, items)
    writer.close()
    return awq.quantization_config(specs, list(dense))


def _read(tmp_path, qconfig):
    return registry.read_quantized(weight_files(tmp_path), {"quantization_config": qconfig})


def _u32(word: int) -> int:
    return word & 0xFFFFFFFF


# --- exact layout, against hand-computed words --------------------------------------------------


def test_nibbles_follow_awq_interleave_along_the_output_dimension():
    # output columns 0..7 hold unsigned codes 1..8 for every input column; column 8 onwards 0
    unsigned = torch.zeros(16, 64, dtype=torch.int16)
    unsigned[:8] = torch.arange(1, 9, dtype=torch.int16).unsqueeze(1)
    codes = (unsigned - 8).to(torch.int8)
    zero = (torch.tensor([[9], [10], [11], [12], [13], [14], [15], [0]] + [[8]] * 8, dtype=torch.int16) - 8)
    q = QuantizedWeight(codes.repeat(4, 1), torch.ones(64, 2).half(), zero.to(torch.int8).repeat(4, 2),
                        QuantSpec(4, 32, False))
    packed = _pack(q)
    qweight, qzeros = packed[f"{MODULE}.qweight"], packed[f"{MODULE}.qzeros"]
    assert qweight.dtype == torch.int32 and qweight.shape == (64, 8)  # [in, out/8]
    assert qzeros.shape == (2, 8) and packed[f"{MODULE}.scales"].shape == (2, 64)
    # nibble i holds column [0, 2, 4, 6, 1, 3, 5, 7][i]: 1, 3, 5, 7, 2, 4, 6, 8 from the bottom
    assert {_u32(w) for w in qweight[:, 0].tolist()} == {0x86427531}
    assert {_u32(w) for w in qweight[:, 1].tolist()} == {0}  # code 0 in every nibble
    # zeros stored as they are (no GPTQ-style minus one): 9, 11, 13, 15, 10, 12, 14, 0
    assert _u32(qzeros[0, 0].item()) == 0x0ECAFDB9
    assert _u32(qzeros[1, 1].item()) == 0x88888888


def test_symmetric_weights_store_zero_eight_and_read_back_symmetric(tmp_path):
    q = quantize_rtn(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half(), QuantSpec(4, 64))
    assert q.zero is None
    qconfig = _write(tmp_path, [(f"{MODULE}.weight", q)])
    assert qconfig["zero_point"] is False and qconfig["sym"] is True
    assert {_u32(w) for w in load_tensors(weight_files(tmp_path))[f"{MODULE}.qzeros"].flatten().tolist()} == {
        0x88888888}
    got = _read(tmp_path, qconfig)[0][f"{MODULE}.weight"]
    assert got.zero is None and got.spec == q.spec and torch.equal(got.codes, q.codes)


def test_packing_matches_gptqmodel_pack_awq_and_its_dequantizer():
    pytest.importorskip("gptqmodel")
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm, pack_awq

    gen = torch.Generator().manual_seed(1)
    spec = QuantSpec(4, 32, False)
    codes = torch.randint(-8, 8, (128, 256), generator=gen, dtype=torch.int8)
    zero = torch.randint(-8, 8, (128, 8), generator=gen, dtype=torch.int8)
    q = QuantizedWeight(codes, torch.rand(128, 8, generator=gen).half() + 0.01, zero, spec)
    packed = _pack(q)
    ref_qweight, ref_qzeros = pack_awq(codes.t().int() + 8, zero.t().int() + 8, 4)
    assert torch.equal(packed[f"{MODULE}.qweight"], ref_qweight)
    assert torch.equal(packed[f"{MODULE}.qzeros"], ref_qzeros)
    weight = dequantize_gemm(packed[f"{MODULE}.qweight"], packed[f"{MODULE}.qzeros"], packed[f"{MODULE}.scales"], 4, 32)
    assert torch.equal(weight.t(), q.dequantize())


# --- round trips ---------------------------------------------------------------------------------


def _assert_same(got: QuantizedWeight, want: QuantizedWeight):
    assert got.spec == want.spec and got.g_idx is None
    assert got.codes.dtype == torch.int8 and torch.equal(got.codes, want.codes)
    assert got.scale.dtype == torch.float16 and torch.equal(got.scale, want.scale)
    if want.zero is None:
        assert got.zero is None
    else:
        assert torch.equal(got.zero, want.zero)
    assert torch.equal(got.dequantize(), want.dequantize())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_write_then_read_gives_identical_quantized_weights(tmp_path, group, symmetric):
    spec = QuantSpec(4, group, symmetric)
    gen = torch.Generator().manual_seed(group + symmetric)
    weights = {f"model.layers.{i}.self_attn.q_proj": torch.randn(256, 384, generator=gen).half() for i in range(2)}
    weights["model.layers.0.self_attn.q_proj"][5, :group] = 0  # an all-zero group: zero at the lowest level
    qs = {m: quantize_rtn(w, spec) for m, w in weights.items()}
    if not symmetric:
        assert bool((qs["model.layers.0.self_attn.q_proj"].zero == spec.qmin).any())
    bias = torch.randn(256, generator=gen).half()
    items = [(f"{m}.weight", q) for m, q in qs.items()] + [("model.layers.0.self_attn.q_proj.bias", bias)]
    qconfig = _write(tmp_path, items)
    quantized, dense = _read(tmp_path, qconfig)
    assert set(quantized) == {f"{m}.weight" for m in qs}
    assert set(dense) == {"model.layers.0.self_attn.q_proj.bias"} and torch.equal(dense[next(iter(dense))], bias)
    for module, q in qs.items():
        _assert_same(quantized[f"{module}.weight"], q)


def test_reads_a_layer_packed_by_gptqmodel(tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    spec = QuantSpec(4, 32, False)
    q = quantize_rtn(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).half(), spec)
    linear = torch.nn.Linear(128, 64, bias=False)
    linear.weight.data = q.dequantize().float()
    layer = AwqTorchLinear(bits=4, group_size=32, sym=False, desc_act=False, in_features=128, out_features=64)
    layer.pack(linear, q.scale, q.zero.to(torch.int32) + 8)
    save_file({f"{MODULE}.{k}": getattr(layer, k).contiguous() for k in awq.SUFFIXES}, str(tmp_path / "m.safetensors"))
    qconfig = {"quant_method": "awq", "version": "GEMM", "bits": 4, "group_size": 32, "zero_point": True}
    _assert_same(_read(tmp_path, qconfig)[0][f"{MODULE}.weight"], q)


def test_reader_refuses_layouts_it_cannot_decode(tmp_path):
    q = quantize_rtn(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half(), QuantSpec(4, 32, False))
    save_file(_pack(q), str(tmp_path / "model.safetensors"))
    qconfig = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True}
    # AutoAWQ's older quant_config.json spelling of the same settings
    legacy = {"quant_method": "awq", "version": "GEMM", "w_bit": 4, "q_group_size": 32, "zero_point": True}
    _assert_same(_read(tmp_path, legacy)[0][f"{MODULE}.weight"], q)
    with pytest.raises(InfoptError, match="qzeros: shape"):
        _read(tmp_path, {**qconfig, "group_size": 64})
    with pytest.raises(InfoptError, match="GEMM layout"):
        _read(tmp_path, {**qconfig, "version": "gemv"})
    with pytest.raises(InfoptError, match="4-bit"):
        _read(tmp_path, {**qconfig, "bits": 8})


# --- what the format cannot hold -------------------------------------------------------------------


def test_mixed_schemes_lm_head_act_order_and_inexact_scales_are_refused(tmp_path):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half()
    a, b = quantize_rtn(w, QuantSpec(4, 32, False)), quantize_rtn(w, QuantSpec(4, 64, False))
    with pytest.raises(InfoptError, match="one scheme"):
        awq.write_weights(_Collect(), [(f"{MODULE}.weight", a), ("model.layers.1.mlp.up_proj.weight", b)])
    with pytest.raises(InfoptError, match="one scheme"):
        awq.quantization_config({MODULE: a.spec, "model.layers.1.mlp.up_proj": b.spec}, [])
    with pytest.raises(InfoptError, match="at least one"):
        awq.quantization_config({}, ["lm_head"])
    with pytest.raises(InfoptError, match="decoder blocks"):
        awq.write_weights(_Collect(), [("lm_head.weight", a)])
    with pytest.raises(InfoptError, match="g_idx"):
        awq.write_weights(_Collect(), [(f"{MODULE}.weight", _act_order(w, a.spec, 0))])
    fp32 = quantize_rtn(w.float(), a.spec)
    with pytest.raises(InfoptError, match="float16"):
        awq.write_weights(_Collect(), [(f"{MODULE}.weight", fp32)])
    exact = QuantizedWeight(fp32.codes, fp32.scale.half().float(), fp32.zero, a.spec)
    assert awq.write_weights(_Collect(), [(f"{MODULE}.weight", exact)]) == {MODULE: a.spec}
    with pytest.raises(InfoptError, match="cannot be written as AWQ"):
        awq.write_weights(_Collect(), [(f"{MODULE}.weight", quantize_rtn(w, QuantSpec(8, 32, False)))])


def test_packable_reasons():
    assert awq.packable((4096, 11008), QuantSpec(4, 128, False)) is None
    assert awq.packable((64, 96), QuantSpec(4, 32, True)) is None
    assert "4-bit" in awq.packable((64, 128), QuantSpec(8, 32))
    assert "4-bit" in awq.packable((64, 128), QuantSpec(3, 32))
    assert "group sizes" in awq.packable((64, 128), QuantSpec(4, -1))
    assert "group sizes" in awq.packable((64, 512), QuantSpec(4, 256))
    assert "group size" in awq.packable((64, 96), QuantSpec(4, 64))
    assert "64" in awq.packable((96, 128), QuantSpec(4, 32))  # out % 64 (CUDA GEMM tile)
    assert "group size" in awq.packable((64, 128), QuantSpec(4, 128))  # out % group


def test_config_keys_and_dense_modules():
    spec = QuantSpec(4, 128, False)
    modules = {f"model.layers.{i}.{p}": spec for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")}
    plain = awq.quantization_config(modules, ["lm_head"])
    assert plain == {"quant_method": "awq", "version": "gemm", "format": "gemm", "bits": 4, "group_size": 128,
                     "zero_point": True, "sym": False, "desc_act": False, "modules_to_not_convert": ["lm_head"]}
    dense = ["lm_head", "model.layers.1.mlp.down_proj"]
    mixed = awq.quantization_config(modules, dense)
    assert mixed["modules_to_not_convert"] == dense
    assert list(mixed["dynamic"]) == [r"-:^model\.layers\.1\.mlp\.down_proj$"]
    assert awq.quantization_config({MODULE: QuantSpec(4, 64, True)}, [])["modules_to_not_convert"] is None


# --- other loaders ---------------------------------------------------------------------------------


def _peers():
    try:
        import gptqmodel  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"AWQ loader not installed (pip install gptqmodel==7.6.0): {exc}")


@pytest.fixture(scope="module", autouse=True)
def _eager():
    """GPTQModel's CPU kernels torch.compile on load (~10 s each); run them eagerly."""
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("src") / "llama"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY_GPTQ)).half()
    model.save_pretrained(path)
    _save_tokenizer(path)  # GPTQModel.load insists on one
    return path


def _checkpoint(src, out, spec, dense=()):
    """A full AWQ folder from the fp16 tiny model: every packable *_proj linear quantized, the rest dense."""
    out.mkdir()
    items = load_tensors(weight_files(src))
    written, dense = {}, list(dense)
    for name in list(items):
        module = name.removesuffix(".weight")
        if not name.endswith("_proj.weight") or module in dense:
            continue
        if awq.packable(tuple(items[name].shape), spec) is None:
            written[name] = items[name] = quantize_rtn(items[name], spec)
        else:
            dense.append(module)
    writer = ShardedWriter(out)
    specs = awq.write_weights(writer, items.items())
    writer.close()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = awq.quantization_config(specs, ["lm_head", *dense])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    artifact.copy_side_files(src, out)
    return out, written, dense


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _ours(path, dtype=torch.float32):
    with torch.no_grad():
        return load_causal_lm(str(path), dtype=dtype)(IDS).logits


def _transformers(path, backend="torch_awq", dtype=torch.float32):
    import transformers

    config = transformers.AwqConfig(bits=4, backend=backend)  # only loading attributes are taken from it
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=config)
    with torch.no_grad():
        return model(IDS).logits.float(), model


def _assert_decodes_to(model, written, dense):
    """GPTQModel's AWQ dequantizer turns each loaded layer into exactly the weights we wrote."""
    from gptqmodel.nn_modules.qlinear import AWQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    layers = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, AWQuantLinear)}
    assert set(layers) == set(written)
    for name, q in written.items():  # both compute (code - zero) * scale once, in fp16
        m = layers[name]
        weight = dequantize_gemm(m.qweight, m.qzeros, m.scales, m.bits, m.group_size).t()
        assert torch.equal(weight.to(q.scale.dtype), q.dequantize()), name
    for module in dense:
        if module != "lm_head":
            assert type(model.get_submodule(module)) is torch.nn.Linear, module


SPECS = [QuantSpec(4, 32, False), QuantSpec(4, 64, False), QuantSpec(4, 64, True), QuantSpec(4, 128, False)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.describe().replace(" ", "-") for s in SPECS])
def test_transformers_loads_checkpoint_and_logits_match_our_reader(tiny_fp16, tmp_path, spec):
    _peers()
    out, written, dense = _checkpoint(tiny_fp16, tmp_path / "q", spec)
    # group 128 leaves k_proj/v_proj ([64, 128]) dense: the CUDA GEMM kernel needs out % group == 0
    assert len(written) == (10 if spec.group_size == 128 else 14)
    want = _ours(out)
    got, model = _transformers(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "AwqTorchLinear"
    _close(got, want, 1e-3)  # the torch kernel multiplies in fp16
    _assert_decodes_to(model, written, dense)
    assert not torch.allclose(_ours(tiny_fp16), want, atol=1e-3)  # and the weights really are quantized


def test_transformers_default_cpu_kernel_with_dense_in_block_linears(tiny_fp16, tmp_path):
    _peers()
    dense = ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj")
    out, written, dense = _checkpoint(tiny_fp16, tmp_path / "q", QuantSpec(4, 32, False), dense)
    assert len(written) == 12
    got, model = _transformers(out, backend="auto")
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "TorchAtenAwqLinear"
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    _close(got, _ours(out), 1e-2)  # the aten int4 kernel runs in bf16


def test_gptqmodel_loads_checkpoint_with_dense_in_block_linears(tiny_fp16, tmp_path):
    # GPTQModel.load ignores modules_to_not_convert: without the `dynamic` "-:" entries it would
    # build empty AWQ layers for the dense linears and return garbage without an error
    _peers()
    from gptqmodel import BACKEND, GPTQModel

    spec, dense = QuantSpec(4, 64, True), ("model.layers.1.mlp.up_proj",)
    out, written, dense = _checkpoint(tiny_fp16, tmp_path / "q", spec, dense)
    model = GPTQModel.load(str(out), device="cpu", backend=BACKEND.AWQ_TORCH, dtype=torch.float16)
    with torch.no_grad():
        _close(model.model(IDS).logits.float(), _ours(out, torch.float16).float(), 1e-3)
    _assert_decodes_to(model.model, written, dense)
