"""One table that says, per architecture, where the decoder layers are and which linears they hold.

Linears are listed in true-sequential order (attention inputs, attention output, MLP inputs, MLP
output) so calibrated methods can quantize them in the order activations flow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from infopt.errors import InfoptError


@dataclass(frozen=True)
class Adapter:
    name: str
    layers: str  # dotted path of the decoder-layer list
    linear_groups: tuple[tuple[str, ...], ...]  # per layer, relative names, grouped by shared input
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def layer_linears(self, num_layers: int) -> list[str]:
        """Full module names of every decoder-layer linear, layer by layer."""
        return [f"{self.layers}.{i}.{name}" for i in range(num_layers) for name in self.linears]

    def layer_index(self, module_name: str) -> int | None:
        match = re.match(rf"{re.escape(self.layers)}\.(\d+)\.", module_name)
        return int(match.group(1)) if match else None


_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_PHI3 = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", "model.layers", _LLAMA_LIKE),
    "mistral": Adapter("mistral", "model.layers", _LLAMA_LIKE),
    "qwen2": Adapter("qwen2", "model.layers", _LLAMA_LIKE),
    "qwen3": Adapter("qwen3", "model.layers", _LLAMA_LIKE),
    "gemma": Adapter("gemma", "model.layers", _LLAMA_LIKE),
    "gemma2": Adapter("gemma2", "model.layers", _LLAMA_LIKE),
    "phi3": Adapter("phi3", "model.layers", _PHI3),
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config: dict) -> Adapter:
    """The adapter for a config.json dict; a clear error naming the supported ones otherwise."""
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        archs = ", ".join(config.get("architectures") or []) or "unknown"
        raise InfoptError(
            f"unsupported architecture {model_type!r} ({archs}); supported: "
            + ", ".join(supported_architectures())
        )
    return ADAPTERS[model_type]
