"""The layer stream reproduces the full model layer by layer, for every adapter architecture."""

import pytest
import torch

from infopt.models.loading import load_causal_lm, open_model
from infopt.models.streaming import LayerStream, move_kwargs
from tests.tiny_models import ARCH_CONFIGS, make_tiny_model


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_streamed_layers_reproduce_the_full_forward(arch, tmp_path):
    # gemma2 alternates sliding-window layers: a window shorter than the sequence makes the masks differ
    extra = {"sliding_window": 8} if arch in ("gemma2", "mistral") else {}
    model_dir = open_model(str(make_tiny_model(arch, tmp_path / arch, **extra)))
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_causal_lm(model_dir).model(ids, output_hidden_states=True)
    stream = LayerStream(model_dir)
    inputs = stream.capture_inputs(ids)
    hidden = inputs.hidden
    for i in range(stream.num_layers):
        layer = stream.load_layer(i)
        assert all(p.is_meta for j in range(stream.num_layers) if j != i for p in stream.layers[j].parameters())
        with torch.no_grad():
            out = layer(hidden, **move_kwargs(inputs.kwargs[i], stream.device))
        hidden = out[0] if isinstance(out, tuple) else out
        stream.release_layer(i)
        if i + 1 < stream.num_layers:
            torch.testing.assert_close(hidden, expected.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
    assert all(p.is_meta for p in stream.layers.parameters())


def test_streamed_tensors_in_one_reused_buffer_equal_fresh_reads(tmp_path):
    """iter_tensors(reuse_buffer=True) yields each tensor in one shared buffer: equal to a fresh read while it is the
    current one (the contract streaming writers rely on), across shards, dtypes and sizes."""
    from safetensors.torch import save_file

    from infopt.formats.safetensors_io import iter_tensors

    g = torch.Generator().manual_seed(0)
    first = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(300, generator=g).to(torch.bfloat16)}
    second = {"c": torch.randint(-128, 127, (64, 3), generator=g, dtype=torch.int8), "d": torch.randn(2, 2, generator=g)}
    files = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    save_file(first, str(files[0]))
    save_file(second, str(files[1]))
    fresh = dict(iter_tensors(files))
    seen = []
    for name, tensor in iter_tensors(files, reuse_buffer=True):
        assert tensor.dtype == fresh[name].dtype and torch.equal(tensor, fresh[name])
        seen.append((name, tensor))
    assert [n for n, _ in seen] == ["a", "b", "c", "d"]
    assert seen[0][1].untyped_storage().data_ptr() == seen[-1][1].untyped_storage().data_ptr()  # one buffer
