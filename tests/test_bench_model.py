"""The bench-model trainer's helpers, and a few steps of a micro model end to end."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_bench_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


MICRO = dict(hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1, max_positions=128, seq_len=128,
             batch=2, steps=5, warmup=2)


def test_default_shapes_pack_with_group_size_128(bench):
    cfg = bench.BenchConfig()
    config = bench.llama_config(cfg)
    assert config.head_dim * cfg.heads == cfg.hidden and not config.tie_word_embeddings
    for size in (cfg.hidden, cfg.intermediate, config.head_dim * cfg.kv_heads, cfg.vocab):
        assert size % 128 == 0
    assert cfg.seq_len == cfg.max_positions


def test_schedule_warms_up_then_decays_to_min_lr(bench):
    cfg = replace(bench.BenchConfig(), steps=100, warmup=10)
    lrs = [bench.lr_at(step, cfg) for step in range(cfg.steps)]
    assert lrs[0] == pytest.approx(cfg.lr / 10) and lrs[9] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(cfg.min_lr)


def test_batches_are_seeded_windows(bench):
    cfg = bench.BenchConfig(**MICRO)
    stream = torch.arange(1000)
    first = bench.sample_batch(stream, cfg, torch.Generator().manual_seed(0))
    again = bench.sample_batch(stream, cfg, torch.Generator().manual_seed(0))
    assert first.shape == (cfg.batch, cfg.seq_len) and torch.equal(first, again)
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.ones(cfg.batch, cfg.seq_len - 1, dtype=torch.long))


def test_hash_names_the_config(bench, monkeypatch, tmp_path):
    monkeypatch.setenv(bench.CACHE_ENV, str(tmp_path))
    cfg = bench.BenchConfig()
    assert bench.default_out(cfg).parent == tmp_path
    assert bench.config_hash(cfg) == bench.config_hash(bench.BenchConfig())
    assert bench.config_hash(replace(cfg, steps=cfg.steps + 1)) != bench.config_hash(cfg)


def test_micro_run_writes_a_complete_folder_and_is_reused(bench, tmp_path):
    cfg = bench.BenchConfig(**MICRO)
    out = bench.build(cfg, tmp_path / "micro", threads=1, max_windows=2)
    assert bench.is_complete(out) and not list(tmp_path.glob(".micro*"))
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 5 and record["eval"]["wikitext2"]["windows"] == 2
    assert record["eval"]["wikitext2"]["ppl"] > 1 and record["wikitext2_unigram_ppl"] > 1
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert bench.build(cfg, out, threads=1) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_widened_model_computes_the_same_function(tmp_path):
    """benchmarks/synthetic.py widen_llama: the speculative benchmark's memory-bound target with trained behaviour."""
    import transformers

    from infopt.quant.rtn import quantize_rtn
    from infopt.quant.spec import QuantSpec
    from tests.tiny_models import make_tiny_model

    spec = importlib.util.spec_from_file_location("synthetic", SCRIPT.parent / "synthetic.py")
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    source = make_tiny_model("llama", tmp_path / "small")
    wide = synthetic.widen_llama(source, tmp_path / "wide", 4)
    small = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    large = transformers.AutoModelForCausalLM.from_pretrained(wide).eval()
    cfg, big = small.config, large.config
    assert (big.hidden_size, big.intermediate_size) == (4 * cfg.hidden_size, 4 * cfg.intermediate_size)
    assert (big.num_attention_heads, big.num_key_value_heads) == (4 * cfg.num_attention_heads,
                                                                  4 * cfg.num_key_value_heads)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = small(ids).logits, large(ids).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
    # each old-width run of columns is the old matrix / 4, so groups quantize to the same codes
    width = cfg.hidden_size
    old = small.model.layers[0].mlp.up_proj.weight.detach()
    new = large.model.layers[0].mlp.up_proj.weight.detach()
    group = QuantSpec(4, 16, True)
    assert torch.equal(quantize_rtn(new[: old.shape[0], :width], group).codes, quantize_rtn(old, group).codes)
