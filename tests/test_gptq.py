"""GPTQ: the algorithm's properties, and the sequential driver's resume / offload / streaming behaviour."""

import json

import pytest
import torch

from infopt.errors import InfoptError
from infopt.formats.safetensors_io import weight_files
from infopt.quant.gptq import GPTQConfig, Hessian, gptq_quantize, output_error
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec
from infopt.workflows import CalibrationData, make_request, quantize, work_dir_for
from tests.tiny_models import copy_tokenizer, make_tiny_model


def _problem(out_f=64, in_f=256, rows=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    scales = torch.linspace(0.1, 3.0, in_f)  # a few strong input channels, as in real activations
    x = (torch.randn(rows, in_f, generator=g) @ mix) * scales
    hessian = Hessian(in_f)
    hessian.add(x)
    return weight, hessian.matrix()


SPECS = [QuantSpec(4, 64, False), QuantSpec(4, -1, True), QuantSpec(3, 32, False), QuantSpec(2, 64, False),
         QuantSpec(8, -1, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("config", [GPTQConfig(), GPTQConfig(act_order=True),
                                    GPTQConfig(act_order=True, static_groups=True), GPTQConfig(static_groups=True)],
                         ids=["plain", "act-order", "act-order-static", "static"])
def test_gptq_beats_round_to_nearest_on_output_error(spec, config):
    weight, hessian = _problem()
    result = gptq_quantize(weight, hessian, spec, config)
    rtn = output_error(weight, quantize_rtn(weight, spec).dequantize(), hessian)
    assert result.output_error < 0.8 * rtn
    q = result.weight
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    # the error the result reports is the one of the weights it returns
    assert result.output_error == pytest.approx(output_error(weight, q.dequantize(), hessian), rel=1e-5)


def test_act_order_groups_are_full_groups_of_columns():
    weight, hessian = _problem()
    q = gptq_quantize(weight, hessian, QuantSpec(4, 32, True), GPTQConfig(act_order=True)).weight
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32
    assert torch.bincount(q.g_idx.long()).tolist() == [32] * 8
    assert not torch.equal(q.g_idx, torch.arange(256, dtype=torch.int32) // 32)  # really reordered
    # the first group holds the columns with the largest Hessian diagonal
    top = set(torch.argsort(hessian.diagonal(), descending=True)[:32].tolist())
    assert set(torch.nonzero(q.g_idx == 0).flatten().tolist()) == top
    static = gptq_quantize(weight, hessian, QuantSpec(4, 32, True), GPTQConfig(act_order=True, static_groups=True))
    assert static.weight.g_idx is None


def test_lazy_block_updates_equal_column_by_column_updates():
    weight, hessian = _problem(in_f=192)
    spec = QuantSpec(4, 64, False)
    blocked = gptq_quantize(weight, hessian, spec, GPTQConfig(block_size=128)).weight
    single = gptq_quantize(weight, hessian, spec, GPTQConfig(block_size=1)).weight
    agree = (blocked.codes == single.codes).float().mean().item()
    assert agree > 0.999  # identical maths; only float rounding can flip a tie
    torch.testing.assert_close(blocked.scale, single.scale, rtol=1e-4, atol=1e-6)


def test_dead_columns_are_zeroed_and_counted():
    weight, hessian = _problem()
    hessian[:, 5] = 0
    hessian[5, :] = 0
    result = gptq_quantize(weight, hessian, QuantSpec(4, 64, False))
    assert result.dead_columns == 1
    assert torch.all(result.weight.dequantize()[:, 5] == 0)


def test_dampening_is_raised_when_the_hessian_is_not_positive_definite():
    weight, hessian = _problem()
    hessian -= 0.05 * hessian.diagonal().mean() * torch.eye(hessian.shape[0])
    result = gptq_quantize(weight, hessian, QuantSpec(4, 64, True), GPTQConfig(damp=0.01))
    assert result.damp > 0.01
    with pytest.raises(InfoptError):
        gptq_quantize(weight, -torch.eye(256), QuantSpec(4, 64, True))


# --- the sequential driver, through the quantize workflow ---


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, stories_hf):
    """A random Llama with stories260K's tokenizer, so calibration text can be tokenized."""
    path = make_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama", vocab_size=512)
    return copy_tokenizer(stories_hf, path)


def _gptq(src, out, seed=0, **kw):
    args = dict(model=str(src), spec=QuantSpec(4, 32, False), out=out, method="gptq",
                calibration=CalibrationData(dataset="tinystories", samples=8, seq_len=64, seed=seed))
    args.update(kw)
    return quantize(make_request(**args))


def _bytes(folder):
    return {p.name: p.read_bytes() for p in weight_files(folder)}


def test_resume_after_an_interruption_gives_the_identical_checkpoint(tiny_llama, tmp_path, monkeypatch):
    from infopt.quant import gptq as gptq_module

    full = tmp_path / "full"
    _gptq(tiny_llama, full)
    assert not work_dir_for(full).exists()

    original = gptq_module.GPTQMethod.quantize_layer
    calls = []

    def failing(self, ctx):
        calls.append(ctx.index)
        if ctx.index == 1:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(gptq_module.GPTQMethod, "quantize_layer", failing)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _gptq(tiny_llama, resumed)
    assert not resumed.exists() and (work_dir_for(resumed) / "layer-00000.safetensors").is_file()
    with pytest.raises(InfoptError, match="--resume"):
        _gptq(tiny_llama, resumed)
    with pytest.raises(InfoptError, match="other inputs or settings"):
        _gptq(tiny_llama, resumed, resume=True, seed=1)
    monkeypatch.setattr(gptq_module.GPTQMethod, "quantize_layer", original)
    calls.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # the resumed run computes on the interrupted run's count
    try:
        report = _gptq(tiny_llama, resumed, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert report["resumed_layers"] == 1 and report["threads"] == threads
    assert _bytes(resumed) == _bytes(full)
    assert not work_dir_for(resumed).exists()


def test_same_inputs_and_seed_give_identical_bytes_and_offload_changes_nothing(tiny_llama, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _gptq(tiny_llama, a)
    _gptq(tiny_llama, b)
    _gptq(tiny_llama, c, offload_activations=True)
    assert _bytes(a) == _bytes(b) == _bytes(c)
    d = tmp_path / "d"
    _gptq(tiny_llama, d, seed=3)
    assert _bytes(d) != _bytes(a)


def test_gptq_checkpoint_loads_in_transformers_with_act_order(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from infopt.models.loading import load_causal_lm

    out = tmp_path / "q"
    report = _gptq(tiny_llama, out, act_order=True, activation_dtype="bfloat16")
    assert report["record"]["static_groups"] and report["options"]["static_groups"] is False  # compressed-tensors keeps act-order only with static groups
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_causal_lm(str(out))(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())
    assert set(report["errors"]) == {e["module"] for e in report["quantized"]}
    assert all(0 < v < 1 for v in report["errors"].values())


def test_calibrated_methods_need_calibration_text(tiny_llama, tmp_path):
    with pytest.raises(InfoptError, match="--calib"):
        _gptq(tiny_llama, tmp_path / "q", calibration=None)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("mistral", {"sliding_window": 24}), ("qwen3", {"head_dim": 16}),
                                        ("gemma2", {"head_dim": 16}), ("phi3", {"pad_token_id": 0})])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_reusing_the_attention_output_changes_no_byte(stories_hf, tmp_path, monkeypatch, arch, extra, method):
    """Later passes replace attention by its output projection on kept inputs: checked, and bit-identical."""
    from infopt.quant.driver import LayerContext

    src = copy_tokenizer(stories_hf, make_tiny_model(arch, tmp_path / arch, vocab_size=512, **extra))
    reused = _gptq(src, tmp_path / "reused", method=method)
    assert reused["attention_reuse"] == {"reused": 2, "rejected": 0}
    monkeypatch.setattr(LayerContext, "reuse_allowed", False)
    plain = _gptq(src, tmp_path / "plain", method=method)
    assert plain["attention_reuse"] == {"reused": 0, "rejected": 0}
    assert _bytes(tmp_path / "reused") == _bytes(tmp_path / "plain")


def test_attention_reuse_is_rejected_when_the_attention_does_more_than_its_projection(tiny_llama, tmp_path,
                                                                                    monkeypatch):
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaAttention.forward

    def scaled(self, *args, **kwargs):
        out, weights = original(self, *args, **kwargs)
        return out * 1.5, weights

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", scaled)
    report = _gptq(tiny_llama, tmp_path / "a")
    assert report["attention_reuse"] == {"reused": 0, "rejected": 2}


def test_symmetric_hessian_accumulation_equals_the_full_product():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(300, 200, generator=g) * torch.linspace(0.1, 4, 200) for _ in range(3)]
    hessian = Hessian(200)  # 200 columns: one whole 128-column block and a partial one
    for x in parts:
        hessian.add(x)
    x = torch.cat(parts).double()
    expected = 2 * x.T @ x / x.shape[0]
    got = hessian.matrix()
    assert torch.equal(got, got.T)
    assert float((got.double() - expected).abs().max() / expected.abs().max()) < 2e-6


def test_fast_fp32_products_stay_fp32_accurate():
    """precision.fast_fp32_products lets oneDNN use its bf16 fpmath mode; it must stay fp32-accurate here."""
    from infopt.quant.precision import fast_fp32_products

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 384, generator=g) * torch.rand(384, generator=g) * 10
    w = torch.randn(256, 384, generator=g)
    with fast_fp32_products(torch.device("cpu")):
        h = torch.zeros(384, 384).addmm_(x.T, x)
        y = torch.nn.functional.linear(x, w)
    exact_h, exact_y = x.double().T @ x.double(), x.double() @ w.double().T
    assert float((h.double() - exact_h).abs().max() / exact_h.abs().max()) < 1e-5
    assert float((y.double() - exact_y).abs().max() / exact_y.abs().max()) < 1e-5  # plain bf16: ~3e-3


def test_linears_sharing_an_input_quantize_as_one_stacked_matrix():
    from infopt.quant.gptq import GPTQMethod

    weight, hessian = _problem(out_f=96)
    spec, method = QuantSpec(4, 64, False), GPTQMethod(GPTQConfig())
    parts = [weight[:32], weight[32:48], weight[48:]]
    together = method._quantize_together(parts, hessian, spec)
    for part, out in zip(parts, together):
        alone = gptq_quantize(part, hessian, spec)
        assert out.weight.codes.shape == part.shape
        assert (out.weight.codes == alone.weight.codes).float().mean() > 0.99  # rows are independent given H
        assert out.output_error == pytest.approx(alone.output_error, rel=0.05)


@pytest.mark.parametrize("choice,expected", [("float32", None), ("bfloat16", torch.bfloat16)])
def test_forward_dtype_choices(choice, expected):
    from infopt.quant.precision import resolve_forward_dtype

    from infopt.device import fast_bf16
    from infopt.quant.registry import get_method

    assert resolve_forward_dtype(choice, True, "cpu") is expected
    assert resolve_forward_dtype(choice, False, "cpu") is expected  # an explicit choice holds for every method
    assert resolve_forward_dtype("auto", False, "cpu") is None
    native = torch.bfloat16 if fast_bf16("cpu") else None
    assert resolve_forward_dtype("auto", True, "cpu") is native
    # the registry entries say which methods take bf16 forwards under auto
    assert get_method("gptq").bf16_forwards and get_method("awq").bf16_forwards
    assert not get_method("rtn").bf16_forwards
    with pytest.raises(InfoptError, match="--forward-dtype"):
        resolve_forward_dtype("half", True, "cpu")


def test_bf16_forwards_change_little_and_restore_attention(tiny_llama, tmp_path):
    from infopt.formats.registry import read_quantized
    from infopt.models.loading import open_model

    def codes(folder):
        model = open_model(str(folder))
        return read_quantized(model.files, model.config)[0]

    exact, fast = tmp_path / "fp32", tmp_path / "bf16"
    report = _gptq(tiny_llama, exact, forward_dtype="float32")
    report_fast = _gptq(tiny_llama, fast, forward_dtype="bfloat16")
    assert report["forward_dtype"] == "float32" and report_fast["forward_dtype"] == "bfloat16"
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored
    a, b = codes(exact), codes(fast)
    same = [float((a[k].codes == b[k].codes).float().mean()) for k in a]
    assert min(same) > 0.8 and sum(same) / len(same) > 0.9
    assert _bytes(exact) != _bytes(fast)  # the option does take effect


def test_the_hessian_of_bf16_inputs_is_fp32_accurate_on_the_fast_path():
    """Inputs that are bf16 values take oneDNN's bf16 fpmath products where those are exact for them."""
    from infopt.quant.gptq import Hessian

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 700, 300, generator=g) * torch.rand(300, generator=g) * 4).bfloat16()
    fast, exact = Hessian(300), Hessian(300)
    fast.add(x)
    exact.add(x.float())  # fp32 inputs: plain fp32 products where the mode would round them
    reference = (x.double().reshape(-1, 300).T @ x.double().reshape(-1, 300)) * (2.0 / 2100)
    for h in (fast.matrix(), exact.matrix()):
        assert float((h.double() - reference).abs().max() / reference.abs().max()) < 2e-6


def test_forward_attention_runs_the_chosen_kernel_and_is_restored():
    from infopt.quant.precision import bf16_attention_kernel_is_faster, forward_attention

    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g) for _ in range(3))
    mask = torch.zeros(64, 64).masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), float("-inf"))
    exact = original(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16), forward_attention():
        assert functional.scaled_dot_product_attention is not original
        out = functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v, mask)  # a float mask too
    assert functional.scaled_dot_product_attention is original
    assert out.dtype == (torch.bfloat16 if bf16_attention_kernel_is_faster() else torch.float32)
    assert float((out.float() - exact).abs().max()) < 3e-2
