"""The method registry in use: a calibration-free method added as one file (HQQ), typed format metadata, and the
module boundaries the registry exists for."""

import json
import subprocess
import sys

import pytest
import torch

from infopt.formats.safetensors_io import load_tensors
from infopt.models.loading import load_causal_lm
from infopt.quant.hqq import HQQConfig, hqq_quantize
from infopt.quant.registry import METHODS
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import Storage
from infopt.workflows import CalibrationData, make_request, quantize
from tests.tiny_models import copy_tokenizer, make_tiny_model


def _lp_error(weight, q, p=0.7):
    return (weight.float() - q.dequantize().float()).abs().pow(p)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(3, 64, False), QuantSpec(4, 32, True),
                                  QuantSpec(2, 16, False)], ids=lambda s: s.describe().replace(" ", "-"))
def test_hqq_never_loses_to_rtn_on_its_objective_and_cuts_the_error_of_real_weights(stories_hf, spec):
    weights = {k: v for k, v in load_tensors(sorted(stories_hf.glob("*.safetensors"))).items()
               if k.endswith(("q_proj.weight", "o_proj.weight", "gate_proj.weight")) and v.shape[1] % spec.group_size == 0}
    assert weights
    config = HQQConfig(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
    rtn_mse = hqq_mse = 0.0
    for name, weight in weights.items():
        rtn, hqq = quantize_rtn(weight, spec), hqq_quantize(weight, spec, Storage(), config)
        assert hqq.codes.dtype == torch.int8 and int(hqq.codes.min()) >= spec.qmin and int(hqq.codes.max()) <= spec.qmax
        assert (hqq.zero is None) is spec.symmetric
        groups = spec.num_groups(weight.shape[1])
        per_group = lambda q: _lp_error(weight, q).reshape(weight.shape[0], groups, -1).sum(-1)  # noqa: E731
        assert bool((per_group(hqq) <= per_group(rtn) * (1 + 1e-6)).all()), name
        rtn_mse += float((weight - rtn.dequantize()).pow(2).sum())
        hqq_mse += float((weight - hqq.dequantize()).pow(2).sum())
    assert hqq_mse < 0.97 * rtn_mse  # the l_p fit also lowers the squared error here


def test_hqq_respects_what_the_format_stores():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    spec = QuantSpec(4, 32, False)
    q = hqq_quantize(weight, spec, Storage(torch.float16, 1), HQQConfig(group_size=32))
    assert q.scale.dtype == torch.float16 and int(q.zero.min()) >= spec.qmin + 1  # GPTQ v1 cannot hold qmin
    assert torch.equal(q.dequantize(), q.dequantize())  # deterministic on the stored fp16 grid
    again = hqq_quantize(weight, spec, Storage(torch.float16, 1), HQQConfig(group_size=32))
    assert torch.equal(q.codes, again.codes) and torch.equal(q.scale, again.scale)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stories_hf):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama", vocab_size=512, hidden_size=128,
                           intermediate_size=256)
    return copy_tokenizer(stories_hf, path)


def test_hqq_checkpoint_loads_in_transformers_with_the_logits_of_our_reader(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hqq"
    report = quantize(make_request(model=str(tiny), out=out, method="hqq", group_size=32, iterations=10))
    assert report["method"] == "hqq" and report["format"] == "compressed-tensors" and not report["skipped"]
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_causal_lm(str(out))(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        source = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)(ids).logits
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())
    assert not torch.allclose(source, ours, atol=1e-6)


@pytest.mark.parametrize("method", ["rtn", "hqq", "awq", "gptq"])
def test_gptq_format_claims_algorithm_settings_only_for_gptq(tiny, tmp_path, method):
    calibration = CalibrationData(dataset="tinystories", samples=4, seq_len=64) if METHODS[method].calibrated else None
    out = tmp_path / method
    quantize(make_request(model=str(tiny), out=out, method=method, fmt="gptq", spec=QuantSpec(4, 32, True),
                          calibration=calibration))
    for name in ("quantize_config.json", "config.json"):
        data = json.loads((out / name).read_text())
        qconfig = data.get("quantization_config", data)
        assert qconfig["quant_method"] == "gptq" and qconfig["bits"] == 4
        assert ("damp_percent" in qconfig) is (method == "gptq"), name
        assert ("true_sequential" in qconfig) is (method == "gptq"), name
    if method == "gptq":
        assert qconfig["damp_percent"] == 0.01 and qconfig["true_sequential"] is True


def test_library_callers_get_each_methods_own_defaults():
    assert make_request(model="m", method="awq").config.symmetric is False  # AWQ's asymmetric default, not the CLI's
    assert make_request(model="m", method="rtn").config.symmetric is True
    with pytest.raises(Exception, match="damp: not an option of method awq"):
        make_request(model="m", method="awq", damp=0.1)


def test_formats_import_no_algorithm_and_the_runtime_no_workflow():
    code = ("import sys, infopt.formats.writers, infopt.formats.registry, infopt.runtime.runner;"
            "print([m for m in ('infopt.quant.rtn', 'infopt.quant.gptq', 'infopt.quant.awq', 'infopt.quant.nf4',"
            " 'infopt.quant.hqq', 'infopt.quant.registry', 'infopt.workflows') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
