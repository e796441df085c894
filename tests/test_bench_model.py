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
