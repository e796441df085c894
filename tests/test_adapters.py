"""Every architecture in the adapter table, on a tiny random model saved as a real HF folder."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infopt.errors import InfoptError
from infopt.eval.footprint import model_shape
from infopt.models.adapters import ADAPTERS, adapter_for, expected_shapes
from infopt.models.loading import load_causal_lm
from infopt.quant.spec import QuantSpec
from infopt.workflows import make_request, quantize
from tests.tiny_models import ARCH_CONFIGS, make_tiny_model


def test_table_covers_the_required_architectures():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"} <= set(ADAPTERS)


def test_unknown_architecture_lists_supported():
    with pytest.raises(InfoptError) as err:
        adapter_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert "gpt2" in str(err.value) and "llama" in str(err.value) and "phi3" in str(err.value)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_architecture_end_to_end(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(arch, tmp_path / "src")
    reference = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    linears = {n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    adapter = ADAPTERS[arch]
    assert set(adapter.layer_linears(reference.config.num_hidden_layers)) == linears

    # config-only arithmetic agrees with the real parameter count
    import json

    config = json.loads((src / "config.json").read_text())
    assert model_shape(config).total_params == sum(p.numel() for p in reference.parameters())

    out = tmp_path / "q"
    report = quantize(make_request(model=str(src), spec=QuantSpec(4, 16, False), out=out))
    assert {e["module"] for e in report["quantized"]} == linears
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = load_causal_lm(str(out))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        a, b, ref = ours(ids).logits, theirs(ids).logits, reference(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert not torch.equal(a, ref)
    # the reader's full-precision path equals transformers on the source
    with torch.no_grad():
        assert torch.allclose(load_causal_lm(str(src))(ids).logits, ref, rtol=1e-5, atol=1e-5)


_SHAPE_ARCHS = sorted(ARCH_CONFIGS)


@st.composite
def _configs(draw):
    arch = draw(st.sampled_from(_SHAPE_ARCHS))
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    config = {"model_type": arch, "num_attention_heads": heads, "num_key_value_heads": kv,
              "hidden_size": heads * draw(st.sampled_from([4, 8, 16])), "intermediate_size": draw(st.integers(1, 40)),
              "num_hidden_layers": draw(st.integers(1, 3)), "vocab_size": draw(st.integers(8, 64)), "pad_token_id": 0}
    if draw(st.booleans()):
        config["head_dim"] = draw(st.sampled_from([4, 8, 12]))
    for flag in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if draw(st.booleans()):
            config[flag] = draw(st.booleans())
    return config


@settings(max_examples=60, deadline=None)
@given(_configs())
def test_the_tables_shapes_are_transformers_own(config):
    """expected_shapes (the adapter table, no transformers import) names every tensor transformers' model has, with its
    shape and tying, whenever it answers at all."""
    from infopt.models.loading import architecture_shapes

    table = expected_shapes(config)
    if config["model_type"] in ("llama", "mistral", "qwen2", "phi3"):
        assert table is not None  # these need no class default to size
    if table is not None:
        shapes, tied = table
        expected, their_tied, _ = architecture_shapes(config)
        assert (shapes, tied) == (expected, their_tied)


def test_opening_a_table_architecture_builds_no_transformers_model(tmp_path):
    """A full-precision folder of an architecture in the table is checked against the table's shapes: opening it
    imports no transformers model code (seconds of a command that needs none, as GGUF and RTN writing)."""
    import subprocess
    import sys

    src = make_tiny_model("llama", tmp_path / "src")
    code = ("import sys; from infopt.models.loading import open_model; open_model(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models')))")
    done = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
