"""AWQ: scale folding keeps the model's function, the search helps, skipped groups are reported."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _layer_context(arch, tmp_path, forward_dtype=None, **extra):
    """Layer 0 of a tiny model as the driver hands it to a method, on 6 windows of 32 tokens."""
    from infopt.quant.driver import ActivationStore, LayerContext, Linear

    stream = LayerStream(open_model(str(make_tiny_model(arch, tmp_path / arch, **extra))))
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    captured = stream.capture_inputs(ids)
    store = ActivationStore(tuple(captured.hidden.shape), torch.float32)
    store.data.copy_(captured.hidden)
    layer = stream.load_layer(0)
    modules = dict(layer.named_modules())
    groups = [[Linear(rel, modules[rel], QuantSpec(4, 32, False)) for rel in group] for group in
              stream.adapter.linear_groups]
    attention = (stream.adapter.attention, stream.adapter.attention_out)
    ctx = LayerContext(0, layer, groups, store, captured.kwargs[0], stream.device, torch.float32, 2, attention,
                       forward_dtype=forward_dtype)
    return stream.adapter, ctx


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_one_observation_pass_sees_what_the_sequential_search_would(arch, tmp_path):
    """AWQ observes every scale group's inputs in one pass before any scale is folded. The search folds group by
    group, so each later group is scored on the inputs of a layer with the earlier scales folded in: the same
    inputs, because a fold leaves the layer's function unchanged."""
    from infopt.quant.awq import AWQConfig, AWQMethod, _Observed

    extra = {"num_key_value_heads": 4} if arch in ("llama", "gemma") else {}  # o_proj foldable there
    adapter, ctx = _layer_context(arch, tmp_path, **extra)
    method = AWQMethod(adapter, AWQConfig(search_tokens=64))  # 2 of the 6 windows
    groups = [g for g in adapter.scale_groups if method._unscalable(
        ctx, g, list(g.linears), {rel: None for rel in g.linears}) is None]
    assert len(groups) >= 2
    linears = [[ctx.layer.get_submodule(rel) for rel in g.linears] for g in groups]
    at_once = method._observe_scale_inputs(ctx, [members[0] for members in linears])
    gen = torch.Generator().manual_seed(1)
    for group, members, seen in zip(groups, linears, at_once):
        sequential = _Observed(ctx, method._search_windows(6, 32), 0, 0)
        ctx.observe_inputs(members[0], sequential.add)
        torch.testing.assert_close(seen.abs_mean(), sequential.abs_mean(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(seen.windows(), sequential.windows(), rtol=1e-4, atol=1e-5)
        assert seen.windows().shape[0] == 2
        width = members[0].in_features
        fold_scale(ctx.layer.get_submodule(group.prev), members, torch.rand(width, generator=gen) * 3 + 0.2,
                   adapter.norm_offset)


def test_observing_several_modules_in_one_pass_gives_each_its_own_inputs(tmp_path):
    _, ctx = _layer_context("llama", tmp_path)
    q, down = ctx.layer.self_attn.q_proj, ctx.layer.mlp.down_proj
    alone = {"q": [], "down": []}
    ctx.observe_inputs(q, alone["q"].append)
    ctx.observe_inputs(down, alone["down"].append)
    together = {"q": [], "down": []}
    ctx.observe_many([(down, together["down"].append), (q, together["q"].append)])
    for name in alone:
        assert len(together[name]) == len(alone[name]) == 3  # one per micro-batch of 2 windows
        for a, b in zip(alone[name], together[name]):
            assert torch.equal(a, b)


def test_reduced_precision_forwards_pass_the_rotary_tables_in_that_dtype(tmp_path):
    _, fp32 = _layer_context("llama", tmp_path / "a")
    _, bf16 = _layer_context("llama", tmp_path / "b", forward_dtype=torch.bfloat16)
    assert fp32.forward_kwargs is fp32.kwargs
    cos, sin = bf16.forward_kwargs["position_embeddings"]
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert bf16.kwargs["position_embeddings"][0].dtype == torch.float32  # the fp32 tables stay for fp32 forwards
    torch.testing.assert_close(cos.float(), bf16.kwargs["position_embeddings"][0], rtol=1e-2, atol=1e-2)
    x = bf16.inputs.data[:2]
    with torch.no_grad():
        exact = fp32.layer(x, **fp32.kwargs)
        exact = exact[0] if isinstance(exact, tuple) else exact
        with bf16.forward_precision():
            fast = bf16.layer(x, **bf16.forward_kwargs)
        fast = fast[0] if isinstance(fast, tuple) else fast
    assert float((fast.float() - exact).norm() / exact.norm()) < 2e-2


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 40), groups=st.integers(1, 4), width=st.integers(1, 24), out=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_group_errors_through_the_gram_matrix_equal_the_direct_products(tokens, groups, width, out, seed):
    from infopt.quant.awq import GroupErrors

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, groups, width, generator=g) * (torch.rand(groups, width, generator=g) * 5)
    diff = torch.randn(out, groups, width, generator=g) * 0.01
    exact = torch.einsum("tgw,ogw->tgo", x.double(), diff.double()).pow(2).mean(0).T
    errors = GroupErrors(x)
    assert (errors.gram is not None) == (width <= tokens)  # the Gram path only where it is the cheaper one
    torch.testing.assert_close(errors(diff), exact, rtol=1e-5, atol=1e-12)
    errors.gram = None  # the direct path
    torch.testing.assert_close(errors(diff), exact, rtol=1e-5, atol=1e-12)
