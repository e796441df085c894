"""Every architecture in the adapter table, on a tiny random model saved as a real HF folder."""

import pytest
import torch

from infopt.errors import InfoptError
from infopt.eval.footprint import model_shape
from infopt.models.adapters import ADAPTERS, adapter_for
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
