"""The compact runtime: logits against transformers, quantized formats against their dequantized models, and the
paged cache / continuous batching against a contiguous cache."""

import json
import random
import struct

import pytest
import torch

from infopt.models.loading import load_causal_lm, open_model
from infopt.quant.spec import QuantSpec
from infopt.runtime import kernels
from infopt.runtime.attention import BatchLayout
from infopt.runtime.engine import Engine, SamplingParams
from infopt.runtime.generate import generate
from infopt.runtime.kv_cache import BlockTable, KVCache, OutOfBlocks
from infopt.runtime.model import load_engine_model, rope_frequencies, rope_parameters
from tests.conftest import run_cli
from tests.tiny_models import copy_tokenizer, make_tiny_model

ROPE_VARIANTS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 2.0},
}
CASES = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": 7}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    **{f"llama-{name}": ("llama", {"rope_scaling": rope}) for name, rope in ROPE_VARIANTS.items()},
}


def _cache_for(model, blocks=64, block_size=4, dtype=torch.float32) -> KVCache:
    return KVCache.for_model(model, blocks, block_size, dtype)


def _stepwise_logits(model, ids: torch.Tensor, prefill: int, block_size: int = 4) -> torch.Tensor:
    """Logits for every position: a prefill of `prefill` tokens, then one token at a time through the cache."""
    cache = _cache_for(model, block_size=block_size)
    table = BlockTable()
    slots = cache.reserve(table, prefill)
    rows = [model(ids[:prefill], BatchLayout.build([0], [prefill], [table.blocks], [slots], block_size, True), cache)]
    for i in range(prefill, len(ids)):
        start = table.length
        slots = cache.reserve(table, 1)
        rows.append(model(ids[i:i + 1], BatchLayout.build([start], [1], [table.blocks], [slots], block_size), cache))
    return torch.cat(rows)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    return {name: make_tiny_model(arch, root / name, seed=i, **extra) for i, (name, (arch, extra)) in enumerate(CASES.items())}


@pytest.mark.parametrize("fused_ops", [True, False], ids=["fused-ops", "torch-ops"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_logits_and_greedy_tokens_match_transformers(tiny_dirs, case, fused_ops):
    model_dir = open_model(str(tiny_dirs[case]))
    reference, model = load_causal_lm(model_dir), load_engine_model(model_dir, fused_ops=fused_ops)
    assert (model.plan is not None) == (fused_ops and kernels.available())  # small steps: one C++ call
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids[None]).logits[0]
    assert _rel(_stepwise_logits(model, ids, 13), want) < 1e-4
    engine = Engine(model, _cache_for(model))
    engine.submit(ids[:5].tolist(), SamplingParams(max_new_tokens=20))
    got = engine.run()[0].generated
    assert got == generate(reference, ids[:5].tolist(), 20)


def test_rope_variants_change_the_frequencies():
    base = {"rope_theta": 10000.0, "rope_type": "default"}
    default, _ = rope_frequencies(base, 16, 128)
    for rope in ROPE_VARIANTS.values():
        inv_freq, scaling = rope_frequencies({**base, **rope}, 16, 128)
        assert not torch.allclose(inv_freq, default)
        assert scaling > 1.0 if rope["rope_type"] == "yarn" else scaling == 1.0


def test_rope_parameters_read_old_style_configs(tiny_dirs):
    config = json.loads((tiny_dirs["llama-llama3"] / "config.json").read_text())
    assert rope_parameters(config)["rope_type"] == "llama3"


def test_stories260k_logits_and_greedy_text_match_transformers(stories_hf):
    model_dir = open_model(str(stories_hf))
    reference, model = load_causal_lm(model_dir), load_engine_model(model_dir)
    ids = torch.tensor([1] + list(range(300, 340)))
    with torch.no_grad():
        want = reference(ids[None]).logits[0]
    assert _rel(_stepwise_logits(model, ids, 17, block_size=16), want) < 1e-4
    engine = Engine(model, _cache_for(model, blocks=32, block_size=16))
    engine.submit([1], SamplingParams(max_new_tokens=100))
    assert engine.run()[0].generated == generate(reference, [1], 100)


# -- quantized formats ----------------------------------------------------------------------------------------

QUANTIZED = {
    "ct-int4-g128-asym": dict(method="rtn", spec=QuantSpec(4, 128, False)),
    "ct-int8-channel": dict(method="rtn", spec=QuantSpec(8, -1, True)),
    "ct-int4-g32-sym": dict(method="rtn", spec=QuantSpec(4, 32, True)),
    "gptq-act-order": dict(method="gptq", spec=QuantSpec(4, 64, True), fmt="gptq", act_order=True),
    "awq-gemm": dict(method="awq", spec=QuantSpec(4, 128, False), fmt="awq"),
    "bnb-nf4": dict(method="nf4", spec=QuantSpec(4, -1, True)),
}


@pytest.fixture(scope="module")
def quantized_dirs(stories_hf, tmp_path_factory):
    from infopt.workflows import CalibrationData, make_request, quantize

    root = tmp_path_factory.mktemp("rtq")
    source = copy_tokenizer(stories_hf, make_tiny_model("llama", root / "src", hidden_size=256, intermediate_size=512,
                                                        vocab_size=512, num_attention_heads=4, num_key_value_heads=2))
    out = {}
    for name, opts in QUANTIZED.items():
        opts = dict(opts)
        act_order = opts.pop("act_order", False)
        calibrated = opts["method"] in ("gptq", "awq")
        calibration = CalibrationData(dataset="tinystories", samples=8, seq_len=64) if calibrated else None
        if act_order:
            opts["act_order"] = True
        if opts["method"] == "nf4":
            del opts["spec"]
        request = make_request(model=str(source), out=root / name, calibration=calibration, **opts)
        quantize(request)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_logits_match_the_dequantized_model(quantized_dirs, name):
    from infopt.runtime.qlinear import QuantLinear

    model_dir = open_model(str(quantized_dirs[name]))
    reference = load_causal_lm(model_dir)  # the reader's dequantized weights in transformers
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(ids[None]).logits[0]
    by_backend = {}
    for backend in ("ext", "torch"):
        model = load_engine_model(model_dir, backend=backend)
        packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
        # every linear's rows (q/k/v and gate/up fused where their layouts match): 2 layers x 2048 rows
        assert sum(m.out_features for m in packed) == 2 * 2048 and 8 <= len(packed) <= 14
        assert all(m.packed is not None or backend == "torch" for m in packed)
        by_backend[backend] = _stepwise_logits(model, ids, 9)
        assert _rel(by_backend[backend], want) < 1e-3, backend
    assert _rel(by_backend["ext"], by_backend["torch"]) < 1e-4


# GGUF types the runtime computes from as integer grids (the mixtures hold Q4_K / Q5_K and Q6_K tensors)
GGUF_BLOCK_TYPES = ["Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def gguf_files(quantized_dirs, tmp_path_factory):
    from infopt.workflows import make_request, quantize

    root = tmp_path_factory.mktemp("rtgguf")
    source = quantized_dirs["ct-int4-g128-asym"].parent / "src"
    for name in GGUF_BLOCK_TYPES:
        quantize(make_request(model=str(source), out=root / f"{name}.gguf", fmt="gguf", gguf_type=name))
    return root


@pytest.mark.parametrize("name", GGUF_BLOCK_TYPES)
def test_gguf_block_types_run_packed_with_the_files_exact_weights(gguf_files, name):
    """Q4_1, Q5_0, Q5_1 and the K-quants stay integer grids in the runtime (4-bit codes as lut4, wider ones as int8,
    float offsets where ggml's blocks have a min), with no dense copy; their weights are the reader's exact values."""
    from infopt.formats.gguf_container import read_header
    from infopt.runtime.kernels import ops
    from infopt.runtime.qlinear import QuantLinear

    path = gguf_files / f"{name}.gguf"
    types = {info.type for n, info in read_header(path).tensors.items() if n.startswith("blk.")}
    assert types - {"F32"} == {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}}.get(name, {name})
    model_dir = open_model(str(path))
    reference = load_causal_lm(model_dir)  # the reader's dequantized weights in transformers
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(ids[None]).logits[0]
    model = load_engine_model(model_dir, backend="ext")
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert sum(m.out_features for m in packed) >= 2 * 2048 and all(m.packed is not None and not m.note for m in packed)
    # a mixture's q/k/v of two layouts (Q6_K attn_v beside Q4_K q/k) stays in the fused C++ step, one product each
    assert model.plan is not None
    if name.endswith("_K_M"):
        assert any(layer.self_attn.qkv.fused is None for layer in model.layers)
    for m in packed:  # each weight the kernels form is the file's value, bit for bit
        rows = ops.kernel_dequantize(m.packed, 0, m.out_features)
        assert torch.equal(rows, ops.torch_dequantize(m.packed, 0, m.out_features))
    assert _rel(_stepwise_logits(model, ids, 9), want) < 1e-4


@pytest.mark.parametrize("name", ["ct-int4-g128-asym", "awq-gemm", "ct-int4-g32-sym"])
def test_int8_activation_backend_stays_close_to_the_exact_kernels(quantized_dirs, name):
    from infopt.runtime import kernels
    from infopt.runtime.qlinear import QuantLinear

    if not kernels.has_vnni():
        pytest.skip("the int8-activation kernel needs AVX512-VNNI")
    model_dir = open_model(str(quantized_dirs[name]))
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(3))
    exact = _stepwise_logits(load_engine_model(model_dir, backend="ext"), ids, 9)
    model = load_engine_model(model_dir, backend="ext-a8")
    backends = {m.backend for m in model.modules() if isinstance(m, QuantLinear)}
    assert backends == ({"ext"} if name == "ct-int4-g32-sym" else {"ext-a8"})  # groups of 32: the exact kernel
    a8 = _stepwise_logits(model, ids, 9)
    if name == "ct-int4-g32-sym":
        assert torch.equal(a8, exact)
    else:
        assert 1e-6 < _rel(a8, exact) < 5e-2


def test_cli_kernels_choice(quantized_dirs):
    path = str(quantized_dirs["ct-int4-g128-asym"])
    runs = {k: run_cli("run", path, "--prompt", "Once", "--max-new-tokens", "6", "--kernels", k, "--json")
            for k in ("ext", "ext-a8", "torch")}
    from infopt.runtime import kernels

    for kernel, result in runs.items():
        assert result.returncode == 0, (kernel, result.stderr)
        report = json.loads(result.stdout)
        assert len(report["requests"][0]["samples"][0]["tokens"]) == 6
        used = "ext" if kernel == "ext-a8" and not kernels.has_vnni() else kernel
        assert report["quantized_linears"] == {used: 8}  # 2 layers: qkv, o, gate_up, down
    bad = run_cli("run", path, "--prompt", "Once", "--max-new-tokens", "2", "--kernels", "fast")
    assert bad.returncode != 0 and "invalid backend 'fast'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", ["ct-int4-g128-asym", "ct-int8-channel", "gptq-act-order", "bnb-nf4"])
def test_fused_projections_compute_what_separate_ones_do(quantized_dirs, stories_hf, name):
    from infopt.runtime.model import Projections

    model_dir = open_model(str(quantized_dirs[name]))
    fused, separate = load_engine_model(model_dir), load_engine_model(model_dir, fuse=False)
    projections = [m for m in fused.modules() if isinstance(m, Projections)]
    assert len(projections) == 4 and all(p.fused is not None for p in projections)
    assert all(p.fused is None for p in separate.modules() if isinstance(p, Projections))
    ids = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(4))
    # decode-sized products go through the kernels, whose rows do not depend on their neighbours
    assert torch.equal(_stepwise_logits(fused, ids, 1), _stepwise_logits(separate, ids, 1))
    assert fused.weight_bytes == separate.weight_bytes
    dense_fused, dense = load_engine_model(open_model(str(stories_hf))), load_engine_model(open_model(str(stories_hf)), fuse=False)
    assert torch.equal(_stepwise_logits(dense_fused, ids, 1), _stepwise_logits(dense, ids, 1))
    assert _rel(_stepwise_logits(dense_fused, ids, 12), _stepwise_logits(dense, ids, 12)) < 1e-5  # prefill: torch GEMM


def _mixed_step_logits(model, prompts: list[list[int]], extra: list[list[int]], block_size: int = 4) -> torch.Tensor:
    """Prefill each prompt alone, then one step appending extra[i] (1 token: decode; several: a speculative check)
    to every sequence at once, all logits returned."""
    cache = _cache_for(model, block_size=block_size)
    tables = [BlockTable() for _ in prompts]
    for table, prompt in zip(tables, prompts):
        slots = cache.reserve(table, len(prompt))
        model(torch.tensor(prompt), BatchLayout.build([0], [len(prompt)], [table.blocks], [slots], block_size), cache)
    starts = [t.length for t in tables]
    slots = [cache.reserve(t, len(e)) for t, e in zip(tables, extra)]
    layout = BatchLayout.build(starts, [len(e) for e in extra], [t.blocks for t in tables], slots, block_size, True)
    return model(torch.tensor([t for e in extra for t in e]), layout, cache)


@pytest.mark.skipif(not kernels.available(), reason=f"infopt kernels unavailable: {kernels.reason()}")
@pytest.mark.parametrize("name,backend", [("ct-int4-g128-asym", "ext"), ("ct-int4-g128-asym", "ext-a8"),
                                          ("ct-int8-channel", "ext"), ("gptq-act-order", "ext"),
                                          ("bnb-nf4", "ext"), ("ct-int4-g32-sym", None), ("dense", None)])
def test_the_fused_decode_step_computes_what_the_torch_modules_do(quantized_dirs, stories_hf, name, backend):
    path = stories_hf if name == "dense" else quantized_dirs[name]
    fused = load_engine_model(open_model(str(path)), backend=backend)
    plain = load_engine_model(open_model(str(path)), backend=backend, fused_ops=False)
    assert fused.plan is not None and plain.plan is None
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (23, 5, 40)]
    for extra in ([[7], [8], [9]], [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]):  # batched decode; decode + checks
        got, want = _mixed_step_logits(fused, prompts, extra), _mixed_step_logits(plain, prompts, extra)
        assert got.shape == want.shape == (sum(map(len, extra)), 512)
        # int8 activations: a last-bit difference upstream can move an activation to the next int8 step
        assert _rel(got, want) < (1e-2 if backend == "ext-a8" else 1e-5), extra


def test_the_torch_backend_keeps_every_op_in_torch(quantized_dirs):
    model = load_engine_model(open_model(str(quantized_dirs["ct-int4-g32-sym"])), backend="torch")
    assert model.plan is None and not any(getattr(m, "fused_ops", False) for m in model.modules())


def test_the_fused_decode_step_in_bfloat16_stays_with_the_torch_modules(stories_hf):
    fused = load_engine_model(open_model(str(stories_hf)), torch.bfloat16)
    plain = load_engine_model(open_model(str(stories_hf)), torch.bfloat16, fused_ops=False)
    prompts, extra = [[1, 403, 407, 261, 378, 1, 8, 360, 17, 15]], [[263, 260, 372]]
    got, want = _mixed_step_logits(fused, prompts, extra), _mixed_step_logits(plain, prompts, extra)
    assert _rel(got, want) < 3e-2  # bf16 activations: one rounding step either way
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_quantized_model_holds_packed_weights(quantized_dirs):
    dense = load_engine_model(open_model(str(quantized_dirs["ct-int8-channel"])), backend="ext")
    int4 = load_engine_model(open_model(str(quantized_dirs["ct-int4-g128-asym"])), backend="ext")
    assert int4.weight_bytes < dense.weight_bytes


# -- paged cache and continuous batching ------------------------------------------------------------------------

def test_block_allocator_sharing_copy_on_write_and_truncate():
    cache = KVCache(1, 6, 1, 2, torch.float32, block_size=4)
    a = BlockTable()
    slots = cache.reserve(a, 6)  # blocks 0 and 1, the second half full
    assert slots.tolist() == [0, 1, 2, 3, 4, 5]
    cache.write(0, slots, torch.arange(12.0).view(6, 1, 2), torch.zeros(6, 1, 2))
    b = cache.fork(a)
    assert cache.allocator.refcount[:2] == [2, 2] and cache.allocator.num_free == 4
    assert cache.blocks_needed(b, 1) == 1  # its partial last block is shared: copied before writing
    cache.reserve(b, 1)
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    assert torch.equal(cache.keys[0][b.blocks[1], :2], cache.keys[0][a.blocks[1], :2])
    cache.truncate(b, 3)
    assert b.blocks == [a.blocks[0]] and b.length == 3
    cache.free(a)
    cache.free(b)
    assert cache.allocator.num_free == 6 and set(cache.allocator.refcount) == {0}
    with pytest.raises(OutOfBlocks):
        cache.reserve(BlockTable(), 25)
    with pytest.raises(RuntimeError):
        cache.allocator.release(0)


class RecordingEngine(Engine):
    """Keeps every logit row each sequence sampled from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: dict[tuple[int, int], list[torch.Tensor]] = {}

    def _append(self, seq, logits):
        self.rows.setdefault((seq.request_id, seq.sample_index), []).append(logits.clone())
        super()._append(seq, logits)


def _assert_no_leaks(engine: Engine) -> None:
    allocator = engine.cache.allocator
    assert allocator.num_free == allocator.num_blocks and set(allocator.refcount) == {0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_batching_with_preemption_equals_a_contiguous_cache(stories_hf, seed):
    model_dir = open_model(str(stories_hf))
    reference, model = load_causal_lm(model_dir), load_engine_model(model_dir)
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))] for _ in range(10)]
    lengths = [rng.randrange(5, 60) for _ in prompts]
    # 14 blocks of 8 tokens hold about three sequences at once: admission waits, decode preempts
    engine = RecordingEngine(model, _cache_for(model, blocks=14, block_size=8), max_batch=rng.choice([3, 4, 16]))
    arrivals = list(range(len(prompts)))
    submitted = 0
    while submitted < len(prompts) or engine.waiting or engine.running:
        if submitted < len(prompts) and rng.random() < 0.4:  # requests arrive while others run
            engine.submit(prompts[submitted], SamplingParams(max_new_tokens=lengths[submitted]))
            submitted += 1
        elif engine.waiting or engine.running:
            engine.step()
    assert engine.timings.preemptions > 0
    _assert_no_leaks(engine)
    finished = sorted(engine.finished, key=lambda s: s.request_id)
    assert [s.request_id for s in finished] == arrivals and all(s.finish_reason == "length" for s in finished)
    for seq, prompt, length in zip(finished, prompts, lengths):
        want_tokens = generate(reference, prompt, length)  # transformers' contiguous cache
        assert seq.generated == want_tokens
        with torch.no_grad():
            want = reference(torch.tensor([prompt + want_tokens[:-1]])).logits[0, len(prompt) - 1:]
        got = torch.stack(engine.rows[(seq.request_id, 0)])
        assert _rel(got, want) < 1e-4


def test_parallel_samples_share_prompt_blocks_and_sample_like_single_requests(stories_hf):
    model = load_engine_model(open_model(str(stories_hf)))
    prompt = [1] + list(range(400, 440))  # 41 tokens: two full shared blocks of 16
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=5, n=4)
    engine = Engine(model, _cache_for(model, blocks=64, block_size=16))
    engine.submit(prompt, params)
    samples = engine.run()
    _assert_no_leaks(engine)
    assert engine.peak_map.shared_blocks == 2 and engine.timings.prefill_tokens == len(prompt)
    assert len({tuple(s.generated) for s in samples}) == 4  # different samples
    for sample in samples:  # each equals the same sample drawn alone
        alone = Engine(model, _cache_for(model, blocks=64, block_size=16))
        alone.submit(prompt, SamplingParams(30, 1.0, 0, 0.9, seed=5 + 1_000_003 * sample.sample_index))
        assert alone.run()[0].generated == sample.generated


def test_a_prompt_larger_than_the_cache_is_refused_up_front(stories_hf):
    model = load_engine_model(open_model(str(stories_hf)))
    engine = Engine(model, _cache_for(model, blocks=2, block_size=4))
    with pytest.raises(ValueError, match="kv-budget-mb"):
        engine.submit(list(range(1, 20)), SamplingParams())


def test_a_sequence_that_outgrows_the_whole_cache_ends_with_kv_budget(stories_hf):
    model = load_engine_model(open_model(str(stories_hf)))
    engine = Engine(model, _cache_for(model, blocks=3, block_size=4))
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=50))
    engine.submit([1, 5], SamplingParams(max_new_tokens=3))
    results = engine.run()
    assert results[0].finish_reason == "kv_budget" and len(results[0].tokens) == 3 * 4 + 1  # the last one needs no slot
    assert results[1].finish_reason == "length" and len(results[1].generated) == 3
    _assert_no_leaks(engine)


# -- the command line ------------------------------------------------------------------------------------------

def test_run_prompts_file_json_and_kv_report(stories_hf, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Once upon a time"}\n{"prompt": "The dog", "max_new_tokens": 5}\n\n'
                       '{"prompt": "Lily and Ben"}\n')
    png = tmp_path / "kv.png"
    result = run_cli("run", str(stories_hf), "--prompts-file", str(prompts), "--n", "2", "--max-new-tokens", "24",
                     "--kv-budget-mb", "0.2", "--kv-report-png", str(png), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engine"] == "infopt" and [len(r["samples"]) for r in report["requests"]] == [2, 2, 2]
    assert [len(s["tokens"]) for s in report["requests"][1]["samples"]] == [5, 5]
    assert report["timings"]["decode_tokens_per_second"] > 0 and report["peak_rss_bytes"] > 0
    assert report["kv_cache"]["at_peak"]["used_blocks"] <= report["kv_cache"]["at_peak"]["blocks"]
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24])[0] > 0
    again = run_cli("run", str(stories_hf), "--prompt", "x", "--kv-report-png", str(png))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    table = run_cli("run", str(stories_hf), "--prompts-file", str(prompts), "--max-new-tokens", "8", "--kv-report")
    assert table.returncode == 0 and "KV page map" in table.stdout and "request 2" in table.stdout


def test_run_rejects_bad_inputs_with_one_line(stories_hf, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    for args, message in [(("--prompts-file", str(bad)), "expected a JSON object"),
                          (("--prompt", "a", "--prompts-file", str(bad)), "not both"),
                          (("--kv-budget-mb", "0.00001"), "below one KV block"),
                          (("--engine", "bogus"), "invalid engine"),
                          (("--engine", "vllm", "--draft", "ngram"), "--draft is infopt's speculative decoding")]:
        result = run_cli("run", str(stories_hf), *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_unsupported_architectures_fall_back_to_transformers_with_a_notice(tmp_path, stories_hf):
    model = copy_tokenizer(stories_hf, make_tiny_model("gemma", tmp_path / "gemma", vocab_size=512))
    result = run_cli("run", str(model), "--prompt", "Once", "--max-new-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    assert "running it through transformers" in result.stderr and json.loads(result.stdout)["engine"] == "transformers"
    forced = run_cli("run", str(model), "--engine", "infopt")
    assert forced.returncode == 2 and "does not support architecture 'gemma'" in forced.stderr


def test_explicit_attention_gives_the_same_logits_as_sdpa(tiny_dirs, monkeypatch):
    from infopt.runtime import attention

    model = load_engine_model(open_model(str(tiny_dirs["mistral-window"])), fused_ops=False)  # SDPA at every step
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(3))
    fused = _stepwise_logits(model, ids, 11)
    monkeypatch.setattr(attention, "sdpa", attention.explicit_attention)
    assert _rel(_stepwise_logits(model, ids, 11), fused) < 1e-5


def _cuda_ready() -> bool:
    from infopt.runtime.kernels import triton_int4

    return torch.cuda.is_available() and triton_int4.available()


@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU with Triton (none here; run on a GPU machine)")
@pytest.mark.parametrize("name", ["ct-int4-g128-asym", "ct-int8-channel", "gptq-act-order", "awq-gemm", "bnb-nf4"])
def test_cuda_runtime_with_triton_kernels_matches_the_dequantized_model(quantized_dirs, name):
    model_dir = open_model(str(quantized_dirs[name]))
    reference = load_causal_lm(model_dir)
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(ids[None]).logits[0]
    model = load_engine_model(model_dir, device="cuda")
    cache = KVCache.for_model(model, 64, 4)
    table = BlockTable()
    rows = []
    for start, n in [(0, 9)] + [(i, 1) for i in range(9, 20)]:
        slots = cache.reserve(table, n)
        layout = BatchLayout.build([start], [n], [table.blocks], [slots], 4, all_logits=True)
        rows.append(model(ids[start:start + n], layout, cache))
    assert _rel(torch.cat(rows), want) < 2e-3


@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU with Triton (none here; run on a GPU machine)")
def test_cuda_engine_greedy_tokens_equal_the_cpu_engine(stories_hf):
    model_dir = open_model(str(stories_hf))
    results = {}
    for device in ("cpu", "cuda"):
        model = load_engine_model(model_dir, device=device)
        engine = Engine(model, KVCache.for_model(model, 64))
        for prompt in ([1], [1, 300, 301, 302]):
            engine.submit(prompt, SamplingParams(max_new_tokens=50))
        results[device] = [seq.tokens for seq in engine.run()]
    assert results["cuda"] == results["cpu"]
