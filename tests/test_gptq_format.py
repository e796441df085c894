"""GPTQ checkpoints: exact bit layout, round trips, and loading by transformers+optimum and GPTQModel."""

import json
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel 7.6 reads this at import

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from infopt.errors import InfoptError  # noqa: E402
from infopt.formats import artifact, gptq, registry  # noqa: E402
from infopt.formats.safetensors_io import ShardedWriter, load_tensors, weight_files  # noqa: E402
from infopt.models.loading import load_causal_lm  # noqa: E402
from infopt.quant.rtn import quantize_rtn  # noqa: E402
from infopt.quant.weights import QuantizedWeight  # noqa: E402
from infopt.quant.spec import QuantSpec  # noqa: E402

# we pass GPTQConfig(backend=...) to pick the kernel; transformers warns that the rest is ignored
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
MODULE = "model.layers.0.mlp.up_proj"


def _ref_words(values: list[int], bits: int) -> list[int]:
    """Reference packer: one big integer holding value k at bits [k*b, (k+1)*b), cut into signed int32s."""
    stream = sum(v << (k * bits) for k, v in enumerate(values))
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(len(values) * bits // 32)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def _act_order(weight: torch.Tensor, spec: QuantSpec, seed: int) -> QuantizedWeight:
    """RTN in a random column order, as act-order GPTQ would group columns; g_idx maps them back."""
    in_f = weight.shape[1]
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    inverse = torch.argsort(perm)
    q = quantize_rtn(weight[:, perm], spec)
    width = in_f // q.scale.shape[1]
    g_idx = (torch.arange(in_f) // width).to(torch.int32)[inverse]
    return QuantizedWeight(q.codes[:, inverse].contiguous(), q.scale, q.zero, spec, g_idx)


class _Collect:
    """Stands in for ShardedWriter: keeps what write_weights adds."""

    def __init__(self):
        self.tensors = {}

    def add(self, name, tensor):
        self.tensors[name] = tensor


def _pack(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    collect = _Collect()
    gptq.write_weights(collect, [(f"{MODULE}.weight", q)])
    return collect.tensors


def _write(tmp_path, items, dense=(), method=None):
    writer = ShardedWriter(tmp_path)
    specs = gptq.write_weights(writer, items)
    writer.close()
    return gptq.quantization_config(specs, list(dense), method or {"desc_act": True})


def _read(tmp_path, qconfig):
    return registry.read_quantized(weight_files(tmp_path), {"quantization_config": qconfig})


# --- exact layout, against hand-computed words --------------------------------------------------


def test_four_bit_qweight_is_eight_codes_per_word_first_input_lowest():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.int8).repeat(32, 1) - 8  # unsigned 1..8
    packed = _pack(QuantizedWeight(codes, torch.ones(32, 1).half(), None, QuantSpec(4, -1)))
    assert packed[f"{MODULE}.qweight"].shape == (1, 32)
    assert packed[f"{MODULE}.qweight"][0, 0].item() & 0xFFFFFFFF == 0x87654321
    # symmetric: unsigned zero 8 stored as 7 in every nibble (v1 "minus one")
    assert packed[f"{MODULE}.qzeros"].shape == (1, 4)
    assert all(w & 0xFFFFFFFF == 0x77777777 for w in packed[f"{MODULE}.qzeros"][0].tolist())


def test_three_bit_codes_straddle_word_boundaries():
    unsigned = [0] * 32
    unsigned[10], unsigned[21], unsigned[31] = 0b101, 0b111, 0b011
    codes = (torch.tensor([unsigned] * 32, dtype=torch.int16) - 4).to(torch.int8)
    packed = _pack(QuantizedWeight(codes, torch.ones(32, 1).half(), None, QuantSpec(3, -1)))
    words = [w & 0xFFFFFFFF for w in packed[f"{MODULE}.qweight"][:, 0].tolist()]
    # code 10: low 2 bits at the top of word 0, high bit at bit 0 of word 1; code 21: low bit at
    # bit 31 of word 1, high 2 bits at the bottom of word 2; code 31 at bits 29-31 of word 2
    assert words == [0x40000000, 0x80000001, 0x60000003]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_reference_stream_for_codes_zeros_scales_and_g_idx(bits):
    out_f, in_f, group = 64, 128, 32
    gen = torch.Generator().manual_seed(bits)
    spec = QuantSpec(bits, group, False)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (out_f, in_f), generator=gen, dtype=torch.int8)
    zero = torch.randint(spec.qmin + 1, spec.qmax + 1, (out_f, in_f // group), generator=gen, dtype=torch.int8)
    scale = torch.rand(out_f, in_f // group, generator=gen).half()
    packed = _pack(QuantizedWeight(codes, scale, zero, spec))
    half = 1 << (bits - 1)
    qweight = packed[f"{MODULE}.qweight"]
    assert qweight.dtype == torch.int32 and qweight.shape == (in_f * bits // 32, out_f)
    for col in (0, 17, out_f - 1):
        assert qweight[:, col].tolist() == _ref_words([c + half for c in codes[col].tolist()], bits)
    qzeros = packed[f"{MODULE}.qzeros"]
    assert qzeros.shape == (in_f // group, out_f * bits // 32)
    for g in range(in_f // group):
        assert qzeros[g].tolist() == _ref_words([z + half - 1 for z in zero[:, g].tolist()], bits)
    assert packed[f"{MODULE}.scales"].dtype == torch.float16
    assert torch.equal(packed[f"{MODULE}.scales"], scale.t())
    assert torch.equal(packed[f"{MODULE}.g_idx"], torch.arange(in_f, dtype=torch.int32) // group)


# --- round trips ---------------------------------------------------------------------------------


def _assert_same(got: QuantizedWeight, want: QuantizedWeight, g_idx_expected: bool):
    assert got.spec == want.spec
    assert got.codes.dtype == torch.int8 and torch.equal(got.codes, want.codes)
    assert got.scale.dtype == torch.float16 and torch.equal(got.scale, want.scale)
    if want.zero is None:
        assert got.zero is None
    else:
        assert torch.equal(got.zero, want.zero)
    if g_idx_expected:
        assert torch.equal(got.g_idx, want.g_idx)
    else:
        assert got.g_idx is None
    assert torch.equal(got.dequantize(), want.dequantize())


LAYOUTS = [(32, False), (32, True), (-1, False)]  # act order with one group changes nothing


@pytest.mark.parametrize("group,act_order", LAYOUTS, ids=["g32", "g32-actorder", "per-channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_write_then_read_gives_identical_quantized_weights(tmp_path, bits, group, symmetric, act_order):
    spec = QuantSpec(bits, group, symmetric)
    gen = torch.Generator().manual_seed(bits * 10 + group)
    weights = {f"model.layers.{i}.self_attn.q_proj": torch.randn(96, 128, generator=gen).half() for i in range(2)}
    qs = {m: _act_order(w, spec, i) if act_order else quantize_rtn(w, spec) for i, (m, w) in enumerate(weights.items())}
    bias = torch.randn(96, generator=gen).half()
    items = [(f"{m}.weight", q) for m, q in qs.items()] + [("model.layers.0.self_attn.q_proj.bias", bias)]
    qconfig = _write(tmp_path, items)
    quantized, dense = _read(tmp_path, qconfig)
    assert set(quantized) == {f"{m}.weight" for m in qs}
    assert set(dense) == {"model.layers.0.self_attn.q_proj.bias"} and torch.equal(dense[next(iter(dense))], bias)
    for module, q in qs.items():
        _assert_same(quantized[f"{module}.weight"], q, act_order)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v2_checkpoints_store_zeros_without_minus_one(tmp_path, bits):
    spec = QuantSpec(bits, 64, False)
    q = quantize_rtn(torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)).half(), spec)
    tensors = _pack(q)
    half = 1 << (bits - 1)
    tensors[f"{MODULE}.qzeros"] = torch.tensor(
        [_ref_words([z + half for z in q.zero[:, g].tolist()], bits) for g in range(2)], dtype=torch.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    qconfig = {"quant_method": "gptq", "bits": bits, "group_size": 64, "sym": False, "checkpoint_format": "gptq_v2"}
    _assert_same(_read(tmp_path, qconfig)[0][f"{MODULE}.weight"], q, False)
    # the same words read as v1 are one level off
    v1 = _read(tmp_path, {**qconfig, "checkpoint_format": "gptq"})[0][f"{MODULE}.weight"]
    assert not torch.equal(v1.zero, q.zero)


def test_v1_reader_adds_one_to_each_zero_like_gptqmodel(tmp_path):
    # 4-bit v1 words 0x0000000F: GPTQModel adds 0x11111111, so the 15 carries: zeros 0, 2, 1, 1, ...
    tensors = {f"{MODULE}.qweight": torch.zeros(8, 32, dtype=torch.int32), f"{MODULE}.scales": torch.ones(1, 32).half(),
               f"{MODULE}.qzeros": torch.full((1, 4), 0xF, dtype=torch.int32),
               f"{MODULE}.g_idx": torch.zeros(64, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    q = _read(tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": False})[0][f"{MODULE}.weight"]
    assert (q.zero[:8, 0] + 8).tolist() == [0, 2, 1, 1, 1, 1, 1, 1]


def test_reader_refuses_layouts_it_cannot_decode(tmp_path):
    q = quantize_rtn(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half(), QuantSpec(4, 32))
    save_file(_pack(q), str(tmp_path / "model.safetensors"))
    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}
    assert _read(tmp_path, qconfig)[0][f"{MODULE}.weight"].spec == QuantSpec(4, 32)
    with pytest.raises(InfoptError, match="qweight: shape"):
        _read(tmp_path, {**qconfig, "bits": 8})
    with pytest.raises(InfoptError, match="shape"):
        _read(tmp_path, {**qconfig, "group_size": 64})
    with pytest.raises(InfoptError, match="marlin"):
        _read(tmp_path, {**qconfig, "checkpoint_format": "marlin"})
    # GPTQModel's per-module `dynamic` overrides pick the spec of matching modules
    override = {**qconfig, "bits": 8, "dynamic": {r"-:.*o_proj": {}, r"+:.*\.mlp\..*": {"bits": 4}}}
    assert _read(tmp_path, override)[0][f"{MODULE}.weight"].spec == QuantSpec(4, 32)


# --- what the format cannot hold -------------------------------------------------------------------


def test_zero_at_lowest_level_is_re_encoded_exactly_or_refused(tmp_path):
    spec = QuantSpec(4, 32, False)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).half()
    weight[3, :32] = 0  # an all-zero group: zero point at the lowest level, codes all there too
    q = quantize_rtn(weight, spec)
    assert q.zero[3, 0] == spec.qmin
    quantized, _ = _read(tmp_path, _write(tmp_path, [(f"{MODULE}.weight", q)]))
    got = quantized[f"{MODULE}.weight"]
    assert got.zero[3, 0] == spec.qmin + 1 and torch.equal(got.dequantize(), q.dequantize())
    weight[3, :32] = torch.linspace(0, 1, 32).half()  # non-negative group spanning the full range
    refused = quantize_rtn(weight, spec)
    assert refused.zero[3, 0] == spec.qmin and refused.codes[3, :32].max() == spec.qmax
    with pytest.raises(InfoptError, match="lowest level"):
        gptq.write_weights(ShardedWriter(tmp_path), [(f"{MODULE}.weight", refused)])


def test_mixed_schemes_outside_blocks_and_undeclared_act_order_are_refused(tmp_path):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half()
    a, b = quantize_rtn(w, QuantSpec(4, 32)), quantize_rtn(w, QuantSpec(8, 32))
    with pytest.raises(InfoptError, match="one scheme"):
        gptq.write_weights(ShardedWriter(tmp_path), [(f"{MODULE}.weight", a), ("model.layers.1.mlp.up_proj.weight", b)])
    with pytest.raises(InfoptError, match="one scheme"):
        gptq.quantization_config({MODULE: a.spec, "model.layers.1.mlp.up_proj": b.spec}, [], {})
    with pytest.raises(InfoptError, match="decoder blocks"):
        gptq.write_weights(ShardedWriter(tmp_path), [("lm_head.weight", a)])
    with pytest.raises(InfoptError, match="desc_act"):
        gptq.write_weights(ShardedWriter(tmp_path), [(f"{MODULE}.weight", _act_order(w, a.spec, 0))], desc_act=False)


def test_packable_reasons():
    assert gptq.packable((64, 128), QuantSpec(4, 32)) is None
    assert gptq.packable((96, 4096), QuantSpec(3, 128)) is None
    assert "32" in gptq.packable((64, 48), QuantSpec(3, -1))
    assert "32" in gptq.packable((48, 64), QuantSpec(3, -1))
    assert gptq.packable((40, 64), QuantSpec(4, -1)) is None
    assert "8" in gptq.packable((36, 64), QuantSpec(4, -1))
    assert "group size" in gptq.packable((64, 96), QuantSpec(4, 64))


def test_config_lists_dense_in_block_linears_for_every_loader(tmp_path):
    spec = QuantSpec(4, 128, True)
    modules = {f"model.layers.{i}.{p}": spec for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")}
    plain = gptq.quantization_config(modules, ["lm_head"], {"desc_act": False, "damp_percent": 0.05})
    assert plain["bits"] == 4 and plain["group_size"] == 128 and plain["sym"] is True
    assert plain["desc_act"] is False and plain["damp_percent"] == 0.05
    assert plain["quant_method"] == plain["checkpoint_format"] == "gptq"
    assert plain["block_name_to_quantize"] == "model.layers"
    assert "modules_in_block_to_quantize" not in plain and "dynamic" not in plain
    del modules["model.layers.1.mlp.up_proj"]
    mixed = gptq.quantization_config(modules, ["lm_head", "model.layers.1.mlp.up_proj"], {})
    assert mixed["modules_in_block_to_quantize"] == [sorted(modules)]  # same suffix is both: full names
    assert list(mixed["dynamic"]) == [r"-:^model\.layers\.1\.mlp\.up_proj$"]
    modules = {m: s for m, s in modules.items() if "up_proj" not in m}
    by_suffix = gptq.quantization_config(modules, ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"], {})
    assert by_suffix["modules_in_block_to_quantize"] == [["self_attn.q_proj"]]
    assert gptq.side_files(tmp_path, by_suffix) == ["quantize_config.json"]
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == by_suffix


# --- other loaders ---------------------------------------------------------------------------------

TINY_GPTQ = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def _peers():
    try:
        import gptqmodel  # noqa: F401
        import optimum.gptq  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"GPTQ loaders not installed (pip install gptqmodel==7.6.0 optimum): {exc}")


@pytest.fixture(scope="module", autouse=True)
def _eager():
    """GPTQModel's torch kernel torch.compiles its dequantizer on load (~10 s each); run it eagerly."""
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


def _save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, TINY_GPTQ["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def _checkpoint(src, out, spec, act_order=False, dense=()):
    """A full GPTQ folder from the fp16 tiny model: every *_proj linear quantized, `dense` left alone."""
    out.mkdir()
    items = load_tensors(weight_files(src))
    written = {}
    for i, name in enumerate(list(items)):
        if name.endswith("_proj.weight") and name.removesuffix(".weight") not in dense:
            weight = items[name]
            written[name] = items[name] = _act_order(weight, spec, i) if act_order else quantize_rtn(weight, spec)
    writer = ShardedWriter(out)
    specs = gptq.write_weights(writer, items.items(), desc_act=act_order)
    writer.close()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = gptq.quantization_config(specs, ["lm_head", *dense], {"desc_act": act_order})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gptq.side_files(out, config["quantization_config"])
    artifact.copy_side_files(src, out)
    return out, written


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _ours(path, dtype=torch.float32):
    with torch.no_grad():
        return load_causal_lm(str(path), dtype=dtype)(IDS).logits


def _transformers(path, bits, backend="gptq_torch", dtype=torch.float32):
    import transformers

    config = transformers.GPTQConfig(bits=bits, backend=backend)  # only loading attributes are taken from it
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=config)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("gptqmodel.nn_modules.qlinear"), type(layer)
    with torch.no_grad():
        return model(IDS).logits.float(), model


def _assert_decodes_to(model, written):
    """The peer's quantized linears dequantize bit-exactly to the weights we wrote."""
    decoded = {f"{name}.weight": m.dequantize_weight().t() for name, m in model.named_modules()
               if hasattr(m, "dequantize_weight")}
    assert set(decoded) == set(written)
    for name, q in written.items():  # both compute (code - zero) * scale once, in fp16
        assert torch.equal(decoded[name].to(q.scale.dtype), q.dequantize()), name


def _close(got, want, rel):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


CASES = [
    (QuantSpec(4, 32, True), False), (QuantSpec(4, 32, False), False), (QuantSpec(4, 64, True), True),
    (QuantSpec(4, 64, False), True), (QuantSpec(4, -1, True), False), (QuantSpec(8, -1, False), False),
    (QuantSpec(3, 32, False), False), (QuantSpec(3, 64, True), True), (QuantSpec(2, 64, False), True),
    (QuantSpec(8, 32, True), False),
]


@pytest.mark.parametrize("spec,act_order", CASES,
                         ids=[f"{s.describe().replace(' ', '-')}{'-actorder' if a else ''}" for s, a in CASES])
def test_transformers_loads_checkpoint_and_logits_match_our_reader(tiny_fp16, tmp_path, spec, act_order):
    _peers()
    out, written = _checkpoint(tiny_fp16, tmp_path / "q", spec, act_order)
    want = _ours(out)
    got, model = _transformers(out, spec.bits)
    _close(got, want, 1e-4)
    _assert_decodes_to(model, written)
    assert not torch.allclose(_ours(tiny_fp16), want, atol=1e-3)  # and the weights really are quantized


def test_transformers_default_kernel_and_dense_in_block_linears(tiny_fp16, tmp_path):
    _peers()
    dense = ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj")
    out, written = _checkpoint(tiny_fp16, tmp_path / "q", QuantSpec(4, 32, True), dense=dense)
    want = _ours(out)
    got, model = _transformers(out, 4)
    _close(got, want, 1e-4)
    _assert_decodes_to(model, written)
    assert len(written) == 12 and type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.o_proj) is not torch.nn.Linear
    got, _ = _transformers(out, 4, backend="auto", dtype=torch.float16)  # CPU kernels run in bf16/fp16
    _close(got, want, 1e-2)


def _gptqmodel(path):
    from gptqmodel import BACKEND, GPTQModel

    # TorchLinear accepts only fp16/bf16 activations when loaded this way
    return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)


@pytest.mark.parametrize("spec,act_order,dense", [
    (QuantSpec(4, 32, True), True, ()), (QuantSpec(3, 64, True), False, ("model.layers.1.mlp.up_proj",)),
], ids=["int4-g32-sym-actorder", "int3-g64-sym-dense-up"])
def test_gptqmodel_loads_checkpoint_and_logits_match_our_reader(tiny_fp16, tmp_path, spec, act_order, dense):
    _peers()
    out, written = _checkpoint(tiny_fp16, tmp_path / "q", spec, act_order, dense)
    model = _gptqmodel(out)
    with torch.no_grad():
        _close(model.model(IDS).logits.float(), _ours(out, torch.float16).float(), 1e-3)
    _assert_decodes_to(model.model, written)
    assert len(written) == 14 - len(dense)
    if dense:
        assert type(model.model.model.layers[1].mlp.up_proj) is torch.nn.Linear
        assert type(model.model.model.layers[0].mlp.up_proj) is not torch.nn.Linear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reads_layers_packed_by_gptqmodel_in_v2_and_its_v1_export(tmp_path, monkeypatch, bits):
    _peers()
    from gptqmodel import QuantizeConfig
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")  # its Python packer; the C++ one builds on first use
    spec = QuantSpec(bits, 32, False)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)).half()
    weight[5] = torch.linspace(0, 1, 128).half()  # zero points at the lowest level, which GPTQModel still writes
    q = _act_order(weight, spec, bits)
    assert bool((q.zero == spec.qmin).any())
    linear = torch.nn.Linear(128, 64, bias=False)
    linear.weight.data = q.dequantize().float()
    layer = TorchLinear(bits, 32, sym=False, desc_act=True, in_features=128, out_features=64)
    layer.pack_block(linear, q.scale.float(), q.zero.to(torch.int32) + (1 << (bits - 1)), q.g_idx)
    qconfig = {"quant_method": "gptq", "bits": bits, "group_size": 32, "sym": False, "desc_act": True}
    for fmt in ("gptq_v2", "gptq"):
        if fmt == "gptq":
            convert_gptq_v2_to_v1_format_module(layer, QuantizeConfig(bits=bits, group_size=32, sym=False))
        save_file({f"{MODULE}.{k}": getattr(layer, k).contiguous() for k in gptq.SUFFIXES},
                  str(tmp_path / "model.safetensors"))
        _assert_same(_read(tmp_path, {**qconfig, "checkpoint_format": fmt})[0][f"{MODULE}.weight"], q, True)


def test_gptqmodel_refuses_asymmetric_v1_from_other_producers(tiny_fp16, tmp_path):
    # GPTQModel 7.6 loads sym=False "gptq" (v1) checkpoints only when meta.quantizer names
    # gptqmodel >= 0.9.0 (AutoGPTQ's v1 writer corrupted zero points of 0). transformers loads them.
    _peers()
    out, _ = _checkpoint(tiny_fp16, tmp_path / "q", QuantSpec(4, 32, False))
    with pytest.raises(ValueError, match="sym=False"):
        _gptqmodel(out)
