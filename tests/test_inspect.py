import json

from infopt.eval.footprint import footprint
from tests.conftest import run_cli

LLAMA2_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "torch_dtype": "float16",
}


def test_llama2_70b_arithmetic():
    r = footprint(LLAMA2_70B, context=4096, batch=1)
    assert r["parameters"] == 68_976_648_192  # Llama-2-70B's published count
    assert r["weight_bytes"]["fp16/bf16"] == 2 * 68_976_648_192  # "about 140 GB"
    # GQA: 8 KV heads x 128 dims x 80 layers x (K and V) x 2 bytes
    assert r["kv_cache"]["bytes_per_token"] == 2 * 80 * 8 * 128 * 2
    assert r["kv_cache"]["bytes"] == 327_680 * 4096
    sizes = r["weight_bytes"]
    assert sizes["fp16/bf16"] > sizes["int8"] > sizes["nf4"] > sizes["nf4-double-quant"]
    assert sizes["int8"] > sizes["int4-g128"]
    # int4 g128: 4.25 bits per linear weight (scale + 4-bit zero per 128), embeddings in fp16
    linear = 68_976_648_192 - 2 * 32000 * 8192 - 80 * 2 * 8192 - 8192
    assert abs(sizes["int4-g128"] - (linear * (4 + 20 / 128) / 8 + (2 * 32000 * 8192 + 80 * 2 * 8192 + 8192) * 2)) < 1e6


def test_inspect_cli_reads_only_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2_70B, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    result = run_cli("inspect", str(tmp_path), "--context", "1024", "--batch", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["parameters"] == 68_976_648_192
    assert report["kv_cache"]["bytes"] == 327_680 * 1024 * 8
    assert report["quantization_config"]["quant_method"] == "gptq"
    text = run_cli("inspect", str(tmp_path / "config.json"))
    assert text.returncode == 0 and "68,976,648,192" in text.stdout and "137.95 GB" in text.stdout


LLAMA3_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 500000.0,
}


def test_capacity_plan_llama3_70b_needs_two_80gb_gpus_in_fp16_and_one_in_int4():
    from infopt.eval.footprint import capacity

    report = footprint(LLAMA3_70B)
    rows = {(r["storage"], r["gpu"]): r for r in capacity(report)}
    fp16, int4 = rows[("fp16/bf16", "H100 80GB")], rows[("int4-g128", "H100 80GB")]
    assert fp16["gpus_needed"] == 2 and int4["gpus_needed"] == 1  # the seed's example
    usable = 0.9 * 80 * 2**30
    per_token = report["kv_cache"]["bytes_per_token"]
    assert fp16["max_kv_tokens"] == int((2 * usable - report["weight_bytes"]["fp16/bf16"]) // per_token)
    assert int4["max_kv_tokens"] == int((usable - report["weight_bytes"]["int4-g128"]) // per_token)
    assert int4["max_batch_at_context"] == int4["max_kv_tokens"] // 8192
    assert not rows[("fp32", "RTX 4090 24GB")]["fits"]  # 8 x 24 GiB x 0.9 < 282 GB
    assert rows[("fp16/bf16", "RTX 4090 24GB")]["gpus_needed"] == 8
    assert rows[("fp16/bf16", "H200 141GB")]["gpus_needed"] == 2  # 141 GB of weights leave no room on one
    for row in rows.values():
        assert {"storage", "gpu", "gpu_memory_bytes", "gpus_needed", "max_kv_tokens"} <= set(row)
        assert (row["gpus_needed"] is None) is (not row["fits"])


def test_inspect_json_lists_fits_for_custom_gpus(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_70B))
    result = run_cli("inspect", str(tmp_path), "--gpu-memory", "48", "--gpu-memory", "96", "--json")
    assert result.returncode == 0, result.stderr
    fits = json.loads(result.stdout)["fits"]
    assert {r["gpu"] for r in fits} == {"48 GiB", "96 GiB"}
    int4 = {r["gpu"]: r for r in fits if r["storage"] == "int4-g128"}
    assert int4["48 GiB"]["gpus_needed"] == 1 and int4["48 GiB"]["gpu_memory_bytes"] == 48 * 2**30
    table = run_cli("inspect", str(tmp_path))
    assert table.returncode == 0 and "H100 80GB" in table.stdout and "GPUs needed" in table.stdout
