"""GGUF: ggml blocks bit-exact with gguf-py, the container checked byte by byte, whole models read back by
gguf-py, by infopt and by llama.cpp itself (llama-cpp-python, built from its sdist by `make install`)."""

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from infopt.errors import InfoptError
from infopt.formats import ggml_quants as ggml
from infopt.formats.gguf import fallback, read_quantized, tensor_type
from infopt.formats.gguf_container import GGUFWriter, read_header, string, u32
from tests.conftest import run_cli
from tests.tiny_models import copy_tokenizer, make_tiny_model

gguf = pytest.importorskip("gguf")  # gguf-py, a test dependency

QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _gguf_type(name):
    return getattr(gguf.GGMLQuantizationType, name)


def _random_blocks(name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes for `name` with every fp16 field finite (so bit-equality is meaningful)."""
    t = ggml.TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // t.block, t.nbytes), dtype=np.uint8)
    offsets = {"Q6_K": [208]}.get(name, [0, 2] if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
    for offset in offsets:
        raw[:, offset : offset + 2] = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16).view(
            np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_dequantization_equals_gguf_py_bit_for_bit(name):
    raw = _random_blocks(name, 4, 512, seed=1)
    ours = ggml.dequantize(name, torch.from_numpy(raw.copy()), 4, 512).numpy()
    reference = gguf.quants.dequantize(raw, _gguf_type(name))
    assert ours.view(np.uint32).tolist() == reference.view(np.uint32).tolist()


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_what_we_quantize_gguf_py_reads_back_identically(name):
    x = torch.randn(6, 512) * torch.rand(1, 512) * 2
    packed = ggml.quantize(name, x)
    assert packed.shape == (6, ggml.row_bytes(name, 512))
    ours = ggml.dequantize(name, packed, 6, 512)
    assert np.array_equal(gguf.quants.dequantize(packed.numpy(), _gguf_type(name)), ours.numpy())
    error = float((ours - x).pow(2).mean() / x.pow(2).mean())
    assert error < {"Q8_0": 1e-4, "Q6_K": 1e-3, "Q5_0": 4e-3, "Q5_1": 4e-3, "Q5_K": 4e-3}.get(name, 1.5e-2), error


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_files_gguf_py_quantizes_read_back_bit_for_bit(name):
    x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    packed = gguf.quants.quantize(x, _gguf_type(name))
    reference = gguf.quants.dequantize(packed, _gguf_type(name))
    assert np.array_equal(ggml.dequantize(name, torch.from_numpy(packed), 5, 256).numpy(), reference)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_our_scale_search_is_no_worse_than_plain_rounding(name):
    """ggml's reference rounding (gguf-py's quantize) against infopt's searched scales, on heavy-tailed weights."""
    x = (torch.randn(64, 1024) * torch.rand(1, 1024) ** 2).numpy()
    plain = gguf.quants.dequantize(gguf.quants.quantize(x, _gguf_type(name)), _gguf_type(name))
    ours = ggml.dequantize(name, ggml.quantize(name, torch.from_numpy(x)), 64, 1024).numpy()
    assert ((ours - x) ** 2).mean() <= ((plain - x) ** 2).mean() * 1.0001


def test_an_importance_matrix_lowers_the_weighted_error():
    x = torch.randn(32, 512)
    importance = torch.rand(512) ** 4 * 100
    plain = ggml.dequantize("Q4_K", ggml.quantize("Q4_K", x), 32, 512)
    weighted = ggml.dequantize("Q4_K", ggml.quantize("Q4_K", x, importance), 32, 512)

    def cost(y):
        return float(((y - x) ** 2 * importance).sum())

    assert cost(weighted) < cost(plain)


def test_mixtures_follow_llama_quant_rules():
    layers = 32
    # attn_v and ffn_down get Q6_K in the first and last eighth and every third layer between (use_more_bits)
    more = [i for i in range(layers) if tensor_type(f"blk.{i}.attn_v.weight", 4096, "Q4_K_M", i, layers, False)[0]
            == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("blk.5.ffn_down.weight", 11008, "Q4_K_M", 5, layers, False)[0] == "Q4_K"
    assert tensor_type("blk.3.attn_v.weight", 4096, "Q4_K_S", 3, layers, False)[0] == "Q5_K"
    assert tensor_type("blk.4.attn_v.weight", 4096, "Q4_K_S", 4, layers, False)[0] == "Q4_K"
    assert tensor_type("blk.3.ffn_down.weight", 11008, "Q4_K_S", 3, layers, False)[0] == "Q5_K"
    assert tensor_type("output.weight", 4096, "Q4_0", None, layers, False)[0] == "Q6_K"
    assert tensor_type("output.weight", 4096, "Q8_0", None, layers, False)[0] == "Q8_0"
    assert tensor_type("token_embd.weight", 4096, "Q4_K_M", None, layers, True)[0] == "Q6_K"  # tied: the output's
    assert tensor_type("token_embd.weight", 4096, "Q4_K_M", None, layers, False)[0] == "Q4_K"
    assert tensor_type("blk.0.ffn_down.weight", 4096, "Q4_0", 0, layers, False, imatrix=True)[0] == "Q4_1"
    # rows that do not split into super-blocks fall back as llama.cpp does; 172 columns fit no block at all
    assert fallback("Q4_K", 4160) == ("Q5_0", "4160 columns do not split into Q4_K blocks: Q5_0")
    assert fallback("Q6_K", 4160)[0] == "Q8_0" and fallback("Q8_0", 172)[0] == "F16"


# --- the container ---


def _tiny_file(path, tensors=(("a.weight", (2, 32), "Q8_0"),)):
    writer = GGUFWriter(path)
    writer.add("general.architecture", string("llama"))
    writer.add("x.count", u32(3))
    for name, shape, kind in tensors:
        writer.add_tensor(name, shape, kind, ggml.quantize(kind, torch.randn(*shape)))
    writer.close()
    return path


def test_the_container_round_trips_and_gguf_py_agrees(tmp_path):
    path = _tiny_file(tmp_path / "t.gguf", (("a.weight", (2, 32), "Q8_0"), ("b.weight", (3, 256), "Q6_K"),
                                            ("c", (7,), "F32")))
    header = read_header(path)
    assert header.metadata == {"general.architecture": "llama", "x.count": 3}
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert info.type == t.tensor_type.name and info.nbytes == t.n_bytes
        assert header.data_offset + info.offset == t.data_offset
        assert bytes(header.tensor_bytes(info).numpy()) == bytes(np.asarray(t.data).view(np.uint8).reshape(-1))


@pytest.mark.parametrize("corrupt,message", [
    (lambda b: b"GGUX" + b[4:], "does not start with 'GGUF'"),
    (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "version 7"),
    (lambda b: b[:8] + struct.pack("<Q", 2**40) + b[16:], "tensors and"),
    (lambda b: b[:-40], "outside the file"),
    (lambda b: b[:60], "the file ends"),
])
def test_a_corrupt_container_is_refused_in_one_line(tmp_path, corrupt, message):
    path = _tiny_file(tmp_path / "t.gguf")
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(InfoptError, match=message) as info:
        read_header(path)
    assert "\n" not in str(info.value)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_any_byte_flip_in_the_header_is_read_or_refused_never_crashes(tmp_path_factory, position, value):
    path = tmp_path_factory.mktemp("flip") / "t.gguf"
    _tiny_file(path)
    data = bytearray(path.read_bytes())
    header_end = read_header(path).data_offset
    data[position % header_end] = value
    path.write_bytes(bytes(data))
    try:
        header = read_header(path)
    except InfoptError as exc:
        assert "\n" not in str(exc)
        return
    for info in header.tensors.values():  # whatever parsed lies inside the file
        assert header.data_offset + info.offset + info.nbytes <= len(data)


# --- whole models ---


def _quantize(src, out, *args):
    done = run_cli("quantize", str(src), "--format", "gguf", "--out", str(out), *args)
    assert done.returncode == 0, done.stderr
    return out


def _llama_cpp(path, **kwargs):
    """llama.cpp on a file. Its CPU weight repacking (AMX/AVX-512 extra buffers) crashes on these tiny shapes,
    for files of its own convert_hf_to_gguf.py as well, so it is turned off."""
    llama_cpp = pytest.importorskip("llama_cpp")
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    import llama_cpp.llama as module

    module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                               seed=0, **kwargs)
    finally:
        module.llama_cpp.llama_model_default_params = default


def _llama_cpp_logits(path, tokens):
    llm = _llama_cpp(path)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)])
    llm.close()
    return logits


def _our_logits(path, tokens):
    from infopt.models.loading import load_causal_lm

    model = load_causal_lm(str(path))
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.fixture(scope="module")
def stories_q8(stories_hf, tmp_path_factory):
    return _quantize(stories_hf, tmp_path_factory.mktemp("gguf") / "stories-q8.gguf", "--gguf-type", "Q8_0")


def test_stories260k_q8_0_in_llama_cpp_tells_the_known_story(stories_q8):
    llm = _llama_cpp(stories_q8)
    text = llm("Once upon a time", max_tokens=20, temperature=0.0)["choices"][0]["text"]
    llm.close()
    # the source model's own greedy continuation (infopt run on the full-precision checkpoint says the same)
    assert text == ", there was a little girl named Lily. She loved to play outsid"


def test_every_tensor_reads_back_as_gguf_py_dequantizes_it(stories_q8, stories_hf):
    from safetensors.torch import load_file

    from infopt.formats.gguf import _Names
    from infopt.models.adapters import adapter_for
    from infopt.models.loading import open_model

    model = open_model(str(stories_q8))
    quantized, dense = read_quantized(model.files, model.config["quantization_config"])
    ours = {**dense, **{k: w.dequantize() for k, w in quantized.items()}}
    reader = gguf.GGUFReader(str(stories_q8))
    names = _Names.build(adapter_for(model.config), model.config)
    to_hf = {v: k for k, v in names.to_gguf.items()}
    for t in reader.tensors:
        reference = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        hf_name = to_hf[t.name]
        mine = ours[hf_name]
        if hf_name in names.permuted:  # stored with llama.cpp's row order
            from infopt.formats.gguf import _permute

            mine = _permute(mine, names.permuted[hf_name])
        assert mine.reshape(reference.shape).view(torch.int32).equal(reference.view(torch.int32)), t.name
    source = load_file(str(stories_hf / "model.safetensors"))
    assert set(ours) | {"lm_head.weight"} >= set(source)
    assert float((ours["model.embed_tokens.weight"] - source["model.embed_tokens.weight"]).abs().max()) < 0.01


def test_llama_cpp_logits_match_our_reader(stories_q8):
    tokens = [1, 403, 407, 261, 378, 426, 346, 286]
    theirs, ours = _llama_cpp_logits(stories_q8, tokens), _our_logits(stories_q8, tokens)
    # llama.cpp rounds activations to 8 bits for Q8_0 products; the same weights otherwise
    assert np.abs(theirs - ours).max() < 0.02 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {"head_dim": 16}),
                                        ("gemma", {"head_dim": 16}),
                                        ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16}),
                                        ("phi3", {"pad_token_id": 0, "original_max_position_embeddings": 128})])
def test_each_architecture_runs_in_llama_cpp_as_it_does_here(stories_hf, tmp_path, arch, extra):
    src = copy_tokenizer(stories_hf, make_tiny_model(arch, tmp_path / arch, vocab_size=512, **extra))
    # the file is named "model": llama.cpp gives a model whose general.name contains "phi3" Phi-3's special
    # tokens, which this tokenizer lacks (llama-vocab.cpp), whatever its architecture
    out = _quantize(src, tmp_path / "model.gguf", "--gguf-type", "F32")
    tokens = [1, 403, 407, 261, 378, 426, 346]
    source, read_back = _our_logits(src, tokens), _our_logits(out, tokens)
    if arch.startswith("gemma"):  # norms are stored as 1 + w (llama.cpp's convention), read back as (1 + w) - 1
        assert np.abs(source - read_back).max() < 1e-5 * max(1.0, np.abs(source).max())
    else:
        assert np.array_equal(source, read_back)  # F32: the file holds the source's exact values
    theirs = _llama_cpp_logits(out, tokens)
    assert np.abs(theirs - source).max() < 1e-3 * max(1.0, np.abs(source).max())


def test_k_quant_mixture_loads_in_llama_cpp_with_its_types(stories_hf, tmp_path):
    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "k", vocab_size=512, hidden_size=256,
                                                    intermediate_size=512, num_hidden_layers=8,
                                                    num_attention_heads=8, num_key_value_heads=4))
    out = _quantize(src, tmp_path / "k.gguf", "--gguf-type", "Q4_K_M", "--json")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.1.attn_v.weight"] == "Q4_K"
    assert types["blk.3.ffn_down.weight"] == "Q6_K" and types["blk.2.ffn_down.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    tokens = [1, 403, 407, 261, 378, 426, 346]
    theirs, ours = _llama_cpp_logits(out, tokens), _our_logits(out, tokens)
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()


def test_gptq_goes_into_q4_0_with_its_grid_untouched(stories_hf, tmp_path):
    """The GGUF file holds exactly GPTQ's codes and fp16 scales: the same run written as GPTQ's own format
    dequantizes to the very same weights."""
    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "src", vocab_size=512, hidden_size=128,
                                                    intermediate_size=256))
    calib = ["--method", "gptq", "--calib", "tinystories", "--calib-samples", "8", "--calib-seq-len", "64",
             "--group-size", "64"]
    out = _quantize(src, tmp_path / "g.gguf", *calib)
    done = run_cli("quantize", str(src), *calib, "--format", "gptq", "--out", str(tmp_path / "gptq"))
    assert done.returncode == 0, done.stderr
    from infopt.formats.registry import read_quantized as read_any
    from infopt.models.loading import open_model

    gguf_model, gptq_model = open_model(str(out)), open_model(str(tmp_path / "gptq"))
    ours, _ = read_any(gguf_model.files, gguf_model.config)
    reference, _ = read_any(gptq_model.files, gptq_model.config)
    assert len(reference) == 14 and set(reference) <= set(ours)
    for name, ref in reference.items():
        got = ours[name]
        assert got.codes.equal(ref.codes), name
        assert got.scale.equal(ref.scale.float().repeat_interleave(2, dim=1)), name  # g64 -> two blocks of 32
    card = (tmp_path / "g.gguf.md").read_text()
    assert "Q4_0" in card and "stored exactly | 14 of 14 quantized linears" in card


def test_awq_goes_into_q4_1_and_runs_in_llama_cpp(stories_hf, tmp_path):
    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "src", vocab_size=512))
    out = _quantize(src, tmp_path / "a.gguf", "--method", "awq", "--calib", "tinystories", "--calib-samples", "8",
                    "--calib-seq-len", "64", "--group-size", "32")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors if ".attn_q." in t.name}
    assert types == {"Q4_1"}
    tokens = [1, 403, 407, 261, 378]
    theirs, ours = _llama_cpp_logits(out, tokens), _our_logits(out, tokens)
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()


def test_bad_requests_get_one_line(stories_hf, tmp_path):
    cases = [
        (["--gguf-type", "Q3_X"], "invalid --gguf-type"),
        (["--method", "gptq", "--calib", "tinystories", "--gguf-type", "Q6_K"], "calibrated methods write GGUF"),
        (["--method", "awq", "--calib", "tinystories", "--gguf-type", "Q5_K_M"], "calibrated methods write GGUF"),
        (["--method", "gptq", "--calib", "tinystories", "--gguf-type", "Q4_K_M"], "no linear takes the Q4_K grid"),
        (["--method", "awq", "--calib", "tinystories", "--gguf-type", "Q4_K_M"], "no linear takes the Q4_K grid"),
        (["--method", "gptq", "--calib", "tinystories", "--gguf-type", "Q4_K_S", "--group-size", "64"],
         "a sub-block of 32 values"),
        (["--method", "gptq", "--calib", "tinystories", "--gguf-type", "Q4_1", "--sym"], "stores int4 asym"),
        (["--bits", "3"], "has no GGUF block"),
        (["--method", "hqq", "--gguf-type", "Q4_K_M"], "--method hqq has no GGUF form yet"),
    ]
    for args, message in cases:
        done = run_cli("quantize", str(stories_hf), "--format", "gguf", "--out", str(tmp_path / "x.gguf"), *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and not (tmp_path / "x.gguf").exists()
    done = run_cli("quantize", str(stories_hf), "--gguf-type", "Q8_0", "--out", str(tmp_path / "y"))
    assert done.returncode == 2 and "--format gguf only" in done.stderr


def test_force_replaces_only_a_gguf_infopt_wrote(stories_hf, tmp_path):
    foreign = tmp_path / "foreign.gguf"
    _tiny_file(foreign)
    before = foreign.read_bytes()
    done = run_cli("quantize", str(stories_hf), "--format", "gguf", "--out", str(foreign), "--force")
    assert done.returncode == 2 and "not a GGUF file infopt wrote" in done.stderr
    assert foreign.read_bytes() == before
    ours = _quantize(stories_hf, tmp_path / "ours.gguf", "--gguf-type", "Q8_0")
    first = ours.read_bytes()
    done = run_cli("quantize", str(stories_hf), "--format", "gguf", "--out", str(ours))
    assert done.returncode == 2 and "already exists" in done.stderr
    _quantize(stories_hf, ours, "--gguf-type", "Q8_0", "--force")
    assert ours.read_bytes() == first  # and the same inputs give the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.gguf", "ours.gguf", "ours.gguf.md"]


def test_eval_and_run_read_gguf(stories_q8):
    done = run_cli("eval", str(stories_q8), "--dataset", "tinystories", "--max-windows", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert 3.0 < json.loads(done.stdout)["ppl"] < 4.5
    done = run_cli("run", str(stories_q8), "--prompt", "Once upon a time", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert "there was a little girl named Lily" in done.stdout


def test_calibration_text_gives_rtn_an_importance_matrix(stories_hf, tmp_path):
    """With --calib, the GGUF writer weights each value's rounding error by the mean x^2 of its input column (as
    llama-imatrix + llama-quantize --imatrix do): the linears change, and on the calibration inputs the layer
    outputs come out closer to the source's than without it."""
    from infopt.models.loading import open_model
    from infopt.models.streaming import LayerStream
    from infopt.quant.imatrix import importance_matrix
    from infopt.workflows import CalibrationData, calibration_set

    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "src", vocab_size=512, hidden_size=256,
                                                    intermediate_size=512, num_hidden_layers=8))
    calib = ["--calib", "tinystories", "--calib-samples", "8", "--calib-seq-len", "128"]
    plain = _quantize(src, tmp_path / "plain.gguf", "--gguf-type", "Q4_0")
    weighted = _quantize(src, tmp_path / "imatrix.gguf", "--gguf-type", "Q4_0", *calib)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(weighted)).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_0"  # llama-quant rule
    assert "importance matrix" in (tmp_path / "imatrix.gguf.md").read_text()
    model = open_model(str(src))
    windows = calibration_set(CalibrationData(dataset="tinystories", samples=8, seq_len=128), model)
    imatrix = importance_matrix(LayerStream(model, torch.float32, "cpu"), windows)
    assert set(imatrix) >= {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(8)}
    from safetensors.torch import load_file

    source = load_file(str(src / "model.safetensors"))

    def output_error(path):
        m = open_model(str(path))
        quantized, dense = read_quantized(m.files, m.config["quantization_config"])
        total = 0.0
        for name, w in quantized.items():
            if "down_proj" in name or name not in imatrix:  # down_proj: Q4_1 in layer 0; lm_head: Q6_K
                continue
            diff = (w.dequantize() - source[name]).pow(2)
            total += float((diff * imatrix[name]).sum())
        return total

    assert output_error(weighted) < output_error(plain)


def test_convert_between_folders_and_gguf_without_rerounding_grids(stories_hf, tmp_path):
    """compressed-tensors with fp16 scales -> GGUF: every quantized linear exact (dry-run says so first); the
    file -> a Hugging Face folder whose weights are the file's exact values."""
    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "src", vocab_size=512, dtype=torch.float16))
    ct = tmp_path / "ct"
    done = run_cli("quantize", str(src), "--bits", "4", "--group-size", "32", "--out", str(ct))
    assert done.returncode == 0, done.stderr
    plan = run_cli("convert", "gguf", str(ct), "--out", str(tmp_path / "c.gguf"), "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    report = json.loads(plan.stdout)
    assert report["gguf_type"] == "Q4_0" and report["exact"] == report["quantized_linears"] == 14
    assert not (tmp_path / "c.gguf").exists()
    done = run_cli("convert", "gguf", str(ct), "--out", str(tmp_path / "c.gguf"))
    assert done.returncode == 0, done.stderr
    from infopt.formats.registry import read_dense_state_dict, read_quantized as read_any
    from infopt.models.loading import open_model

    source, converted = open_model(str(ct)), open_model(str(tmp_path / "c.gguf"))
    theirs, _ = read_any(source.files, source.config)
    ours, _ = read_any(converted.files, converted.config)
    for name, w in theirs.items():
        assert ours[name].codes.equal(w.codes) and ours[name].scale.equal(w.scale.float()), name
    back = tmp_path / "back"
    done = run_cli("convert", "gguf", str(tmp_path / "c.gguf"), "--out", str(back))
    assert done.returncode == 0, done.stderr
    from infopt.models.loading import load_state_dict

    folder = load_state_dict(open_model(str(back)))
    expected = read_dense_state_dict(converted.files, converted.config)
    assert folder.keys() == expected.keys() and all(folder[k].equal(expected[k]) for k in folder)
    assert (back / "tokenizer.json").is_file()
    assert np.array_equal(_our_logits(back, [1, 403, 407]), _our_logits(tmp_path / "c.gguf", [1, 403, 407]))


def test_a_file_gguf_py_writes_reads_back_as_its_source(stories_hf, tmp_path):
    """A GGUF from another writer (gguf-py's own GGUFWriter, as llama.cpp's converter uses it): no infopt keys, so
    the config comes from llama.cpp's keys, and q/k rows come back out of llama.cpp's order."""
    from safetensors.torch import load_file

    from infopt.formats.gguf import _permute

    src = copy_tokenizer(stories_hf, make_tiny_model("llama", tmp_path / "src", vocab_size=512))
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    path = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in tensors.items():
        if name in names:
            target = names[name]
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:]).removesuffix(".weight")
            target = f"blk.{layer}.{parts[rest]}.weight"
        if ".q_proj." in name:
            tensor = _permute(tensor, config["num_attention_heads"])
        if ".k_proj." in name:
            tensor = _permute(tensor, config["num_key_value_heads"])
        writer.add_tensor(target, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokens = [1, 403, 407, 261]
    assert np.array_equal(_our_logits(path, tokens), _our_logits(src, tokens))
    done = run_cli("eval", str(path), "--dataset", "tinystories", "--max-windows", "1")
    assert done.returncode == 2 and "pass --tokenizer" in done.stderr
    done = run_cli("eval", str(path), "--dataset", "tinystories", "--max-windows", "1", "--tokenizer", str(src),
                   "--json")
    assert done.returncode == 0, done.stderr
    reference = run_cli("eval", str(src), "--dataset", "tinystories", "--max-windows", "1", "--json")
    assert json.loads(done.stdout)["ppl"] == json.loads(reference.stdout)["ppl"]


def test_a_gemma2_query_scale_llama_cpp_cannot_express_is_refused(stories_hf, tmp_path):
    src = copy_tokenizer(stories_hf, make_tiny_model("gemma2", tmp_path / "g2", vocab_size=512, head_dim=16,
                                                    query_pre_attn_scalar=256))
    done = run_cli("quantize", str(src), "--format", "gguf", "--gguf-type", "F32", "--out", str(tmp_path / "g.gguf"))
    assert done.returncode == 2 and "query_pre_attn_scalar 256" in done.stderr
    assert not (tmp_path / "g.gguf").exists() and [p.name for p in tmp_path.iterdir()] == ["g2"]


def test_the_gguf_type_sets_a_calibrated_methods_grid(stories_hf, tmp_path):
    out = _quantize(stories_hf, tmp_path / "q8.gguf", "--method", "gptq", "--calib", "tinystories",
                    "--calib-samples", "4", "--calib-seq-len", "64", "--group-size", "32", "--gguf-type", "Q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(5)} == {"Q8_0"}
    assert "stored exactly | 30 of 30" in (tmp_path / "q8.gguf.md").read_text()


@pytest.fixture(scope="module")
def wide_llama(stories_hf, tmp_path_factory):
    """A random Llama whose linears are all 256-multiples, so K-quants apply everywhere."""
    return copy_tokenizer(stories_hf, make_tiny_model(
        "llama", tmp_path_factory.mktemp("wide") / "src", vocab_size=512, hidden_size=256, intermediate_size=512,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4))


# KL to the source of a calibrated method's file on the Q4_K grid, as a fraction of the writer's own rounding. GPTQ must
# beat it; AWQ only stay near it: a random model has no salient channels for its scales to protect (measured: KL
# 0.00215 against 0.00198), while an unfolded or mis-stored scale would cost far more than the bound.
K_GRID_KL_BOUND = {"gptq": 0.9, "awq": 1.5}


@pytest.mark.parametrize("method", list(K_GRID_KL_BOUND))
def test_calibrated_methods_on_the_k_quant_grid_store_what_they_optimized(wide_llama, tmp_path, method):
    """GPTQ and AWQ quantize each Q4_K tensor on the very grid the file stores (6-bit sub-block scales under fp16
    super-scales: GPTQ fits them as it reaches each super-block, AWQ scores its scale candidates with the scaled
    weights rounded to them); the mixture's Q6_K tensors are written from full precision, as llama-quantize writes
    them. The Q4_K tensors hold exactly the method's codes, and llama.cpp computes what infopt's reader computes."""
    ours_file = _quantize(wide_llama, tmp_path / "m.gguf", "--method", method, "--calib", "tinystories",
                          "--calib-samples", "16", "--calib-seq-len", "128", "--gguf-type", "Q4_K_M")
    rtn_file = _quantize(wide_llama, tmp_path / "r.gguf", "--gguf-type", "Q4_K_M")
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(ours_file)).tensors}
    assert ours == {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(rtn_file)).tensors}  # the mixture
    assert ours["blk.0.attn_v.weight"] == "Q6_K" and ours["blk.1.attn_v.weight"] == "Q4_K"
    card = (tmp_path / "m.gguf.md").read_text()
    quantized_on_grid = sum(1 for n, t in ours.items() if t == "Q4_K" and n.startswith("blk."))
    assert f"stored exactly | {quantized_on_grid} of {quantized_on_grid}" in card

    def kl(path):
        done = run_cli("eval", str(path), "--dataset", "tinystories", "--baseline", str(wide_llama),
                       "--max-windows", "8", "--seq-len", "128", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["kl_mean"]

    assert kl(ours_file) < K_GRID_KL_BOUND[method] * kl(rtn_file)
    tokens = [1, 403, 407, 261, 378, 426, 346]
    theirs, mine = _llama_cpp_logits(ours_file, tokens), _our_logits(ours_file, tokens)
    assert np.abs(theirs - mine).max() < 0.05 * np.abs(mine).max()


def test_k_grid_results_survive_the_work_folder(tmp_path):
    from infopt.quant.driver import LayerResult, load_part, save_part
    from infopt.quant.gptq import _KGridParams

    params = _KGridParams(4, 512, "cpu")
    w = torch.randn(4, 512)
    for index in range(2):
        params.fit(index, w[:, index * 256 :])
    codes = torch.randint(0, 16, (4, 512), dtype=torch.int8)
    weight = params.result(codes, None)
    save_part(tmp_path / "p.safetensors", LayerResult(quantized={"m": weight}))
    back = load_part(tmp_path / "p.safetensors").quantized["m"]
    assert back.dequantize().equal(weight.dequantize()) and back.sc.equal(weight.sc) and back.d.equal(weight.d)


def test_split_max_size_writes_llama_cpps_shards(wide_llama, tmp_path):
    """--split-max-size writes gguf-split's files: NAME-0000k-of-0000N.gguf, each a whole GGUF file with split.no /
    split.count / split.tensors.count and at most the size in tensor data, the first holding all metadata; the
    shards hold the unsplit file's tensors byte for byte, and llama.cpp and infopt load the model from the first."""
    whole = _quantize(wide_llama, tmp_path / "whole.gguf", "--gguf-type", "Q4_K_M")
    _quantize(wide_llama, tmp_path / "m.gguf", "--gguf-type", "Q4_K_M", "--split-max-size", "1M")
    shards = sorted(tmp_path.glob("m-*.gguf"))
    count = len(shards)
    assert count >= 3 and [p.name for p in shards] == [f"m-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert not (tmp_path / "m.gguf").exists() and (tmp_path / "m.gguf.md").is_file()
    reference = {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(str(whole)).tensors}
    seen = {}
    for index, path in enumerate(shards):
        reader = gguf.GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        assert (fields["split.no"], fields["split.count"], fields["split.tensors.count"]) == (index, count,
                                                                                              len(reference))
        assert ("general.architecture" in fields) == (index == 0)
        sizes = [t.n_bytes + (-t.n_bytes % 32) for t in reader.tensors]
        assert len(sizes) == 1 or sum(sizes) <= 10**6
        seen.update({t.name: bytes(t.data.tobytes()) for t in reader.tensors})
    assert seen == reference
    tokens = [1, 403, 407, 261, 378, 426, 346]
    assert np.array_equal(_our_logits(shards[0], tokens), _our_logits(whole, tokens))
    assert np.abs(_llama_cpp_logits(shards[0], tokens) - _llama_cpp_logits(whole, tokens)).max() < 1e-4
    done = run_cli("inspect", str(shards[0]), "--json")  # the config from the first shard's header
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["parameters"] == json.loads(run_cli("inspect", str(wide_llama), "--json").stdout)[
        "parameters"]


def test_split_files_are_checked_and_replaced_only_whole(wide_llama, tmp_path):
    _quantize(wide_llama, tmp_path / "m.gguf", "--gguf-type", "Q8_0", "--split-max-size", "2M")
    shards = sorted(tmp_path.glob("m-*.gguf"))
    assert len(shards) >= 3
    done = run_cli("eval", str(shards[1]), "--dataset", "tinystories", "--max-windows", "1")
    assert done.returncode == 2 and f"open its first shard, {shards[0].name}" in done.stderr
    done = run_cli("quantize", str(wide_llama), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                   "--split-max-size", "2M")
    assert done.returncode == 2 and "already exists" in done.stderr  # no --force, nothing touched
    moved = shards[-1].rename(tmp_path / "aside.bin")
    done = run_cli("run", str(shards[0]), "--prompt", "a", "--max-new-tokens", "2")
    assert done.returncode == 2 and f"{shards[-1].name}, is missing" in done.stderr and "Traceback" not in done.stderr
    moved.rename(shards[-1])
    # --force with fewer, larger shards: every earlier shard goes, none of the old set is left to mix in
    _quantize(wide_llama, tmp_path / "m.gguf", "--gguf-type", "Q8_0", "--split-max-size", "4M", "--force")
    now = sorted(p.name for p in tmp_path.glob("m-*.gguf"))
    assert 1 < len(now) < len(shards) and all(name.endswith(f"-of-{len(now):05d}.gguf") for name in now)
    # an unsplit file under the same name replaces them too
    _quantize(wide_llama, tmp_path / "m.gguf", "--gguf-type", "Q8_0", "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.md"]
    foreign = tmp_path / "m-00001-of-00002.gguf"
    _tiny_file(foreign)
    done = run_cli("quantize", str(wide_llama), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--force",
                   "--split-max-size", "2M")
    assert done.returncode == 2 and "not a GGUF file infopt wrote" in done.stderr and foreign.is_file()
    done = run_cli("quantize", str(wide_llama), "--out", str(tmp_path / "folder"), "--split-max-size", "2M")
    assert done.returncode == 2 and "--split-max-size splits a GGUF file" in done.stderr
