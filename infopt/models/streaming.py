"""Decoder layers one at a time: a weightless model skeleton, layer-0 inputs, and per-layer loading.

The skeleton is the transformers model built on the meta device, so it costs no memory. Only the
embeddings (and the rotary table) are materialised to compute the inputs of decoder layer 0; each
decoder layer is then loaded from the safetensors shards when its turn comes and released after.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from infopt.errors import InfoptError
from infopt.formats.safetensors_io import tensor_names
from infopt.models.adapters import Adapter, adapter_for
from infopt.models.loading import ModelDir, hf_config_from_dict, load_state_dict, no_init_weights, text_config


class TensorSource:
    """Reads named tensors from the source checkpoint without loading the rest."""

    def __init__(self, model: ModelDir):
        self._pickled = load_state_dict(model) if model.pickle else None
        self._files: dict[str, Path] = {} if model.pickle else tensor_names(model.files)

    def names(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._files)

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        if self._pickled is not None:
            return {n: self._pickled[n] for n in names}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._files[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                out.update({n: handle.get_tensor(n) for n in wanted})
        return out

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix.`, keyed by their name relative to it."""
        names = [n for n in self.names() if n.startswith(prefix + ".")]
        return {n[len(prefix) + 1 :]: t for n, t in self.get(names).items()}


class _StopForward(Exception):
    pass


class _LayerCatcher(nn.Module):
    """Stands in for decoder layer i: records its call arguments and passes the input through."""

    def __init__(self, index: int, record_inputs: bool):
        super().__init__()
        self.index = index
        self.record_inputs = record_inputs
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise InfoptError("decoder layers called with positional arguments are not supported")
        if self.record_inputs:
            self.inputs.append(hidden_states.detach())
        if self.kwargs is None:
            self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        return hidden_states


class _Stop(nn.Module):
    def forward(self, *args, **kwargs):
        raise _StopForward


def _set(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


@dataclass
class LayerInputs:
    hidden: torch.Tensor  # [windows, seq, hidden] in the compute dtype, on the host
    kwargs: list[dict]  # per decoder layer: the keyword arguments the model passes it (masks, rotary, ...)


class LayerStream:
    """The source model as a meta skeleton plus a tensor source; decoder layers load on demand."""

    def __init__(self, model: ModelDir, compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.model_dir = model
        self.adapter: Adapter = adapter_for(text_config(model.config))
        self.dtype = compute_dtype
        self.device = torch.device(device)
        self.source = TensorSource(model)
        hf_config = hf_config_from_dict(model.config)
        hf_config.use_cache = False
        with torch.device("meta"), no_init_weights():
            self.skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=compute_dtype)
        self.skeleton.eval()
        self.layers: nn.ModuleList = self.skeleton.get_submodule(self.adapter.layers)
        self.num_layers = len(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.adapter.layers}.{index}"

    def _materialize_outside_layers(self) -> None:
        """Real modules for everything outside the decoder layers, embeddings loaded from disk.

        They come from the same architecture built with zero layers on the host, so buffers computed
        at construction (rotary tables, embedding scales) are right; weights are left uninitialised
        (untouched memory) except the embeddings', which are loaded.
        """
        from transformers import AutoModelForCausalLM

        shallow_config = copy.deepcopy(self.skeleton.config)
        shallow_config.num_hidden_layers = 0
        if getattr(shallow_config, "layer_types", None) is not None:
            shallow_config.layer_types = []
        with no_init_weights():
            shallow = AutoModelForCausalLM.from_config(shallow_config, dtype=self.dtype)
        base_name = self.adapter.layers.rpartition(".")[0]
        base, shallow_base = self.skeleton.get_submodule(base_name), shallow.get_submodule(base_name)
        for name, module in shallow_base.named_children():
            if name != self.adapter.layers.rpartition(".")[2]:
                setattr(base, name, module.to(self.device))
        embed_name = self.adapter.embed
        weight = self.source.get([f"{embed_name}.weight"])[f"{embed_name}.weight"]
        self.skeleton.get_submodule(embed_name).weight.data = weight.to(self.device, self.dtype)

    def capture_inputs(self, windows: torch.Tensor) -> LayerInputs:
        """Run the embeddings on each window; return layer-0 inputs and every layer's call arguments."""
        self._materialize_outside_layers()
        originals = list(self.layers)
        catchers = [_LayerCatcher(i, record_inputs=(i == 0)) for i in range(self.num_layers)]
        norm = self.skeleton.get_submodule(self.adapter.final_norm)
        base = self.skeleton.get_submodule(self.adapter.layers.rpartition(".")[0])
        for i, catcher in enumerate(catchers):
            self.layers[i] = catcher
        _set(self.skeleton, self.adapter.final_norm, _Stop())
        try:
            with torch.no_grad():
                for row in windows:
                    try:
                        base(input_ids=row.unsqueeze(0).to(self.device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            _set(self.skeleton, self.adapter.final_norm, norm)
        hidden = torch.cat([h.to("cpu", self.dtype) for h in catchers[0].inputs])
        return LayerInputs(hidden, [c.kwargs or {} for c in catchers])

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer `index` with its weights from disk, on the compute device and dtype."""
        layer = self.layers[index]
        state = self.source.with_prefix(self.layer_prefix(index))
        state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        expected = set(layer.state_dict())
        if set(state) != expected:
            missing = sorted(expected - set(state))[:3]
            raise InfoptError(f"layer {index}: weights do not match the architecture (missing {missing})")
        layer.load_state_dict(state, assign=True)
        if any(b.is_meta for b in layer.buffers()):
            raise InfoptError(f"cannot stream layer {index}: it has computed buffers")
        return layer.to(self.device)

    def release_layer(self, index: int) -> None:
        self.layers[index] = self.layers[index].to("meta")


def move_kwargs(kwargs: dict, device: torch.device) -> dict:
    """Layer call arguments with every tensor (also inside tuples) on `device`."""

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in kwargs.items()}
