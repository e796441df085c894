"""One validation layer for what infopt reads from other people: model configs, before anything is sized from them.

Every reader and command calls these checks before it allocates or computes from a value (safetensors headers and
index files are checked in infopt.formats.safetensors_io, quantization configs here and in each format's reader).
Errors are one line naming the file, the field, the value and what was expected; bounds are generous (well past
the largest public models) and only exist so a hostile or broken file cannot make infopt allocate without limit.
"""

from __future__ import annotations

import math
from typing import Any

from infopt.errors import InfoptError

# field (and the aliases other architectures use) -> inclusive bounds
INT_FIELDS: dict[str, tuple[tuple[str, ...], int, int]] = {
    "hidden_size": (("hidden_size", "n_embd", "d_model"), 1, 1 << 17),
    "intermediate_size": (("intermediate_size", "n_inner", "ffn_dim"), 1, 1 << 20),
    "num_hidden_layers": (("num_hidden_layers", "n_layer", "num_layers"), 1, 1024),
    "num_attention_heads": (("num_attention_heads", "n_head"), 1, 1024),
    "num_key_value_heads": (("num_key_value_heads",), 1, 1024),
    "head_dim": (("head_dim",), 1, 4096),
    "vocab_size": (("vocab_size",), 1, 1 << 22),
    "max_position_embeddings": (("max_position_embeddings", "n_positions"), 1, 1 << 24),
    "num_local_experts": (("num_local_experts", "num_experts"), 0, 4096),
    "moe_intermediate_size": (("moe_intermediate_size",), 1, 1 << 20),
    "sliding_window": (("sliding_window",), 1, 1 << 24),
}
FLOAT_FIELDS: dict[str, tuple[float, float]] = {"rms_norm_eps": (0.0, 1.0), "rope_theta": (0.0, 1e12)}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
MAX_PARAMETERS = 10**13  # 10T: an estimate past this is a broken config, not a model


def _fail(source: str, field: str, value: Any, expected: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise InfoptError(f"{source}: {field} = {shown}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(cfg: dict, names: tuple[str, ...]) -> tuple[str, Any] | None:
    for name in names:
        if cfg.get(name) is not None:
            return name, cfg[name]
    return None


def check_model_config(config: Any, source: str, required: tuple[str, ...] = REQUIRED) -> dict:
    """Validate a config.json dict (the text part of a multimodal one); returns it. `required` fields must be there
    (under any alias); every field present is type- and range-checked, and the shapes must fit together."""
    if not isinstance(config, dict):
        _fail(source, "config", config, "a JSON object")
    text = config.get("text_config", config)
    if not isinstance(text, dict):
        _fail(source, "text_config", text, "a JSON object")
    model_type = text.get("model_type", config.get("model_type"))
    if model_type is not None and (not isinstance(model_type, str) or not 0 < len(model_type) <= 64):
        _fail(source, "model_type", model_type, "a short architecture name such as 'llama'")
    values: dict[str, int] = {}
    for field, (names, low, high) in INT_FIELDS.items():
        found = _number(text, names)
        if found is None:
            if field in required:
                raise InfoptError(f"{source}: {field} is missing (needed to size the model)")
            continue
        name, value = found
        if not _is_int(value):
            _fail(source, name, value, "an integer")
        if not low <= value <= high:
            _fail(source, name, value, f"an integer from {low} to {high}")
        values[field] = value
    for field, (low, high) in FLOAT_FIELDS.items():
        value = text.get(field)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            _fail(source, field, value, "a finite number")
        if not low < value < high:
            _fail(source, field, value, f"a number between {low:g} and {high:g}")
    heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
    if heads and hidden and "head_dim" not in values and hidden % heads:
        _fail(source, "hidden_size", hidden, f"a multiple of num_attention_heads ({heads}), or an explicit head_dim")
    kv = values.get("num_key_value_heads")
    if heads and kv and heads % kv:
        _fail(source, "num_key_value_heads", kv, f"a divisor of num_attention_heads ({heads})")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if key in text and text[key] is not None and not isinstance(text[key], bool):
            _fail(source, key, text[key], "true or false")
    for key in ("rope_scaling", "quantization_config"):
        value = config.get(key, text.get(key))
        if value is not None and not isinstance(value, dict):
            _fail(source, key, value, "a JSON object or null")
    quant = config.get("quantization_config")
    if quant is not None and not isinstance(quant.get("quant_method"), str):
        _fail(source, "quantization_config.quant_method", quant.get("quant_method"), "a string such as 'gptq'")
    _check_size(values, source)
    return config


def _check_size(values: dict[str, int], source: str) -> None:
    hidden, layers, vocab = (values.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
    if not (hidden and layers and vocab):
        return
    inter = values.get("intermediate_size", 4 * hidden)
    experts = max(1, values.get("num_local_experts", 0))
    estimate = layers * (4 * hidden * hidden + 3 * hidden * inter * experts) + 2 * vocab * hidden
    if estimate > MAX_PARAMETERS:
        raise InfoptError(f"{source}: the shapes describe about {estimate:.2e} parameters; "
                          f"expected at most {MAX_PARAMETERS:.0e} (a broken or hostile config)")


def check_known_architecture(config: dict, source: str) -> None:
    """transformers must know the model_type (its own error lists every known type: thousands of characters)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        listed = config.get("architectures")
        archs = ", ".join(str(a)[:40] for a in listed[:3]) if isinstance(listed, list) and listed else "none listed"
        raise InfoptError(f"{source}: unknown architecture {str(model_type)[:64]!r} (architectures: {archs}); transformers "
                          "has no model of this type")
