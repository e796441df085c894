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
