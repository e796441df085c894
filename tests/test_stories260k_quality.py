"""Real model, real text: int8 keeps stories260K's quality, int4 costs more."""

import pytest

from infopt.quant.spec import QuantSpec
from infopt.workflows import EvaluationSpec, make_request, evaluate_checkpoint, generate_text, quantize
from tests.conftest import KNOWN_STORY


@pytest.fixture(scope="module")
def quantized(stories_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, spec in {"int8": QuantSpec(8, -1, True), "int4": QuantSpec(4, -1, False)}.items():
        out[name] = root / name
        quantize(make_request(model=str(stories_hf), spec=spec, out=out[name]))
    return out


def test_fp32_and_int8_reproduce_the_known_greedy_text(stories_hf, quantized):
    for model in (stories_hf, quantized["int8"]):
        result = generate_text(str(model), "", max_new_tokens=64)
        assert result["text"].startswith(KNOWN_STORY), result["text"]


def test_int8_within_one_percent_and_int4_worse(stories_hf, quantized):
    int8 = evaluate_checkpoint(str(quantized["int8"]), "tinystories", baseline=str(stories_hf), max_windows=300)
    int4 = evaluate_checkpoint(str(quantized["int4"]), "tinystories", baseline=str(stories_hf), max_windows=300)
    assert int8["tokens"] == 300 * 511
    assert abs(int8["ppl_delta_rel"]) < 0.01
    assert int4["ppl"] > int8["ppl"]
    assert int4["kl_mean"] > int8["kl_mean"] and int4["top1_agreement"] < int8["top1_agreement"]


def test_eval_during_quantize_lands_in_the_model_card(stories_hf, tmp_path):
    out = tmp_path / "int8"
    report = quantize(make_request(model=str(stories_hf), spec=QuantSpec(8, -1, True), out=out,
                                   evaluation=EvaluationSpec(datasets=("tinystories",), max_windows=10)))
    metrics = report["eval"]["tinystories"]
    assert metrics["windows"] == 10 and metrics["baseline_ppl"] > 1
    card = (out / "README.md").read_text()
    assert f"{metrics['ppl']:.4f}" in card and "tinystories" in card
