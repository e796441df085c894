"""AWQ: scale folding keeps the model's function, the search helps, skipped groups are reported."""

import json

import pytest
import torch

from infopt.formats.safetensors_io import weight_files
from infopt.models.adapters import ADAPTERS
from infopt.models.loading import load_causal_lm, open_model
from infopt.models.streaming import LayerStream, move_kwargs
from infopt.quant.awq import fold_scale
from infopt.quant.spec import QuantSpec
from infopt.workflows import CalibrationData, make_request, evaluate_checkpoint, quantize, work_dir_for
from tests.tiny_models import ARCH_CONFIGS, copy_tokenizer, make_tiny_model


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_folding_scales_leaves_the_full_precision_layer_unchanged(arch, tmp_path):
    extra = {"attention_bias": True} if arch == "llama" else {}
    extra.update({"num_key_value_heads": 4} if arch in ("llama", "gemma") else {})  # o_proj foldable
    stream = LayerStream(open_model(str(make_tiny_model(arch, tmp_path / arch, **extra))))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = stream.capture_inputs(ids)
    layer = stream.load_layer(0)
    kwargs = move_kwargs(inputs.kwargs[0], stream.device)
    with torch.no_grad():
        before = layer(inputs.hidden, **kwargs)
    modules = dict(layer.named_modules())
    folded = 0
    gen = torch.Generator().manual_seed(1)
    for group in ADAPTERS[arch].scale_groups:
        prev, linears = modules[group.prev], [modules[n] for n in group.linears]
        width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.shape[0]
        if width != linears[0].in_features:
            continue
        fold_scale(prev, linears, torch.rand(width, generator=gen) * 3 + 0.2, ADAPTERS[arch].norm_offset)
        folded += 1
    with torch.no_grad():
        after = layer(inputs.hidden, **kwargs)
    assert folded >= 2
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stories_hf):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama", vocab_size=512, hidden_size=128,
                           intermediate_size=256, num_key_value_heads=4)
    return copy_tokenizer(stories_hf, path)


def _awq(src, out, samples=8, seq_len=64, **kw):
    args = dict(model=str(src), spec=QuantSpec(4, 32, False), out=out, method="awq", grid=5, clip_grid=10,
                calibration=CalibrationData(dataset="tinystories", samples=samples, seq_len=seq_len))
    args.update(kw)
    return quantize(make_request(**args))


def _bytes(folder):
    return {p.name: p.read_bytes() for p in weight_files(folder)}


def test_awq_checkpoint_loads_in_transformers_and_resumes_identically(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from infopt.quant import awq

    full = tmp_path / "full"
    report = _awq(tiny, full)
    assert report["notes"] == []  # every group foldable here (no grouped-query attention)
    alphas = {i["alpha"] for i in report["layer_info"].values() if "alpha" in i}
    assert alphas and alphas != {0.0}
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_causal_lm(str(full))(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max().item())

    original = awq.AWQMethod.quantize_layer

    def failing(self, ctx):
        if ctx.index == 1:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(awq.AWQMethod, "quantize_layer", failing)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _awq(tiny, resumed)
    monkeypatch.setattr(awq.AWQMethod, "quantize_layer", original)
    assert _awq(tiny, resumed, resume=True)["resumed_layers"] == 1
    assert _bytes(resumed) == _bytes(full) and not work_dir_for(resumed).exists()


def test_awq_beats_rtn_on_stories260k_and_reports_unfoldable_groups(stories_hf, tmp_path):
    spec = QuantSpec(3, -1, False)
    awq_out, rtn_out = tmp_path / "awq", tmp_path / "rtn"
    report = _awq(stories_hf, awq_out, spec=spec, samples=16, seq_len=256,
                  grid=10, clip_grid=20)
    quantize(make_request(model=str(stories_hf), spec=spec, out=rtn_out))
    assert any("self_attn.o_proj: no AWQ scale" in n and "grouped-query" in n for n in report["notes"])
    config = json.loads((awq_out / "config.json").read_text())
    assert "model.layers.0.input_layernorm.weight" not in config  # sanity: config untouched by folding
    awq_ppl = evaluate_checkpoint(str(awq_out), "tinystories", max_windows=60)["ppl"]
    rtn_ppl = evaluate_checkpoint(str(rtn_out), "tinystories", max_windows=60)["ppl"]
    assert awq_ppl < rtn_ppl * 0.9


def test_scale_search_scores_candidates_on_evenly_spaced_whole_windows():
    from infopt.quant.awq import AWQConfig, AWQMethod

    method = AWQMethod(None, AWQConfig(search_tokens=256))
    assert method._search_windows(10, 64).tolist() == [0, 3, 6, 9]
    assert method._search_windows(3, 64).tolist() == [0, 1, 2]  # under the budget: everything
    assert AWQMethod(None, AWQConfig(search_tokens=0))._search_windows(10, 64).tolist() == list(range(10))
    with pytest.raises(Exception):
        AWQConfig(search_tokens=-1)


def test_streamed_observation_keeps_only_what_the_search_needs():
    """Batches arrive in window order; the observer keeps the chosen windows, every k-th token and the head."""
    from infopt.quant.awq import _Observed

    class Ctx:
        batch_start = 0

    x = torch.randn(10, 8, 3, generator=torch.Generator().manual_seed(0))
    ctx = Ctx()
    observed = _Observed(ctx, torch.tensor([0, 4, 9]), token_step=7, head_tokens=20)
    for start in range(0, 10, 3):  # micro-batches of 3 windows
        ctx.batch_start = start
        observed.add(x[start : start + 3])
    flat = x.reshape(-1, 3)
    assert torch.allclose(observed.abs_mean(), flat.abs().mean(0), atol=1e-6)
    assert torch.equal(observed.windows(), x[[0, 4, 9]])
    assert torch.equal(observed.sampled(), flat[::7])
    assert torch.equal(observed.head(), flat[:20])


def test_a_dead_channel_gets_a_finite_scale(tiny, tmp_path):
    """An MLP channel with zero weights sees zero activations: its scale was 0/0 (NaN everywhere after the
    normalisation), which turned the written scales infinite."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "dead"
    shutil.copytree(tiny, src)
    tensors = load_file(str(src / "model.safetensors"))
    for proj in ("gate_proj", "up_proj"):
        tensors[f"model.layers.0.mlp.{proj}.weight"][7] = 0
    tensors["model.layers.0.mlp.down_proj.weight"][:, 7] = 0
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    _awq(src, tmp_path / "awq", fmt="awq")
    scales = load_file(str(tmp_path / "awq" / "model.safetensors"))["model.layers.0.mlp.up_proj.scales"]
    assert bool(torch.isfinite(scales).all()) and float(scales.abs().max()) < 100
    ppl = evaluate_checkpoint(str(tmp_path / "awq"), "tinystories", max_windows=4)["ppl"]
    source_ppl = evaluate_checkpoint(str(src), "tinystories", max_windows=4)["ppl"]
    assert ppl < source_ppl * 1.1
