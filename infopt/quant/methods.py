"""What a quantization method is to the rest of infopt: a config class of its own options and one registry entry.

A method's options are the fields of its (frozen, keyword-only) config dataclass. Each field carries the command-line
flag and help text through `option()`, so the CLI's flags, the recipe schema, the `--dry-run` plan and the refusal of
options a method does not use are all derived from the config classes listed in `infopt.quant.registry`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch

from infopt.errors import InfoptError
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import MethodRecord, Storage

INTEGER = "integer"  # QuantizedWeight: integer codes with group scales (and zero points)
FOUR_BIT = "four-bit"  # FourBitWeight: bitsandbytes' NF4/FP4 tables


def option(default: Any, flag: str, help: str, **limits: Any) -> Any:
    """A config field with its command-line flag ("--x", or "--x/--no-x" for a switch) and help text.

    limits: `minimum`, `maximum` (inclusive) and `choices`, checked for recipes and flags alike."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, **limits})


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method's options; subclasses add fields with `option()`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                _check_limits(f, getattr(self, f.name))
            except InfoptError as exc:
                exc.field = f.name  # a recipe names the field, the CLI its flag
                raise

    def spec(self) -> QuantSpec:
        """The scheme the planner applies to every linear (overrides may change it per module)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.spec().describe()

    def weight_bytes(self, spec: QuantSpec, shape: tuple[int, int], dense_element_bytes: int) -> int:
        """Bytes one quantized linear takes on disk."""
        return spec.packed_bytes(shape[0], shape[1], dense_element_bytes) + 16

    def record(self, method: str, storage: Storage) -> MethodRecord:
        """What the output format may record about how the weights were made."""
        return MethodRecord(method=method)


def _check_limits(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise InfoptError(f"invalid {meta['flag'].split('/')[0]} {value!r}: choose one of "
                          f"{', '.join(map(str, meta['choices']))}")
    if "minimum" in meta and value < meta["minimum"]:
        raise InfoptError(f"invalid {meta['flag'].split('/')[0]} {value}: at least {meta['minimum']}")
    if "maximum" in meta and value > meta["maximum"]:
        raise InfoptError(f"invalid {meta['flag'].split('/')[0]} {value}: at most {meta['maximum']}")


@dataclass(frozen=True, kw_only=True)
class IntegerScheme(MethodConfig):
    """Options of every method that produces integer codes with group scales."""

    bits: int = option(4, "--bits", "Bits per weight: 2, 3, 4 or 8.", choices=(2, 3, 4, 8))
    group_size: int = option(128, "--group-size", "Inputs per scale; -1 for one scale per output channel.")
    symmetric: bool = option(True, "--sym/--asym", "Symmetric (no zero point) or asymmetric (with zero points).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec()  # refuses a group size QuantSpec cannot hold

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


@dataclass(frozen=True, kw_only=True)
class CalibratedRun:
    """Options of the sequential driver that calibrated methods run on (how, not what: see infopt.quant.driver)."""

    device: str = option("auto", "--device", "Where layers are quantized: auto, cpu or cuda.")
    forward_dtype: str = option("auto", "--forward-dtype", "Matmuls of the calibration forwards: auto (bfloat16 for "
                                "GPTQ and AWQ where bf16 is native, else float32), float32 or bfloat16. Weights and the "
                                "quantization stay float32.", choices=("auto", "float32", "bfloat16"))
    offload_activations: bool = option(False, "--offload-activations", "Keep calibration activations on disk.")
    activation_dtype: str | None = option(None, "--activation-dtype", "Store calibration activations as float32, "
                                          "bfloat16 or float16.", choices=("float32", "bfloat16", "float16"))

    def activation_torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.activation_dtype) if self.activation_dtype else None


@dataclass(frozen=True)
class Method:
    """One registry entry. `factory(config, storage, adapter)` returns, for a calibration-free method, an object with
    `quantize_weight(tensor, spec) -> weight`, and for a calibrated one a driver method with `quantize_layer(ctx)`
    (see infopt.quant.driver). The default symmetry and every other default live in the config class."""

    name: str
    summary: str
    config: type[MethodConfig]
    weights: str  # INTEGER or FOUR_BIT
    default_format: str
    calibrated: bool
    factory: Callable[[Any, Storage, Any], Any]
    grids: tuple[str, ...] = ()  # fixed grids (Storage.grid) the method can quantize against, e.g. GGUF's "Q4_K"
    recoverable: bool = False  # block-wise recovery (infopt.quant.recovery) can start from its integer result
    # --forward-dtype auto runs its calibration forwards' matrix products in bf16 where that is native
    bf16_forwards: bool = False
    # a calibration-free method whose GGUF file is the writer's own rounding of each tensor to its llama.cpp type
    gguf_rounding: bool = False

    def options(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.config)}

    def defaults(self) -> MethodConfig:
        return self.config()

    def make_config(self, values: dict[str, Any], where: str = "") -> MethodConfig:
        """The config from option values by field name; refuses names the method does not have and wrong types."""
        return build_config(self.config, values, where, f"method {self.name}")


def build_config(config: type[MethodConfig], values: dict[str, Any], where: str = "", owner: str = "") -> MethodConfig:
    """A config from option values by field name, refusing unknown names (naming `owner`'s options) and wrong types;
    `where` prefixes every message (a recipe's field path)."""
    options = {f.name for f in dataclasses.fields(config)}
    for key, value in values.items():
        if key not in options:
            raise InfoptError(f"{where}{key}: not an option of {owner} (its options: {', '.join(options) or 'none'})")
        _check_type(f"{where}{key}", value, option_type(config, key))
    try:
        return config(**values)
    except InfoptError as exc:
        if where:
            field = getattr(exc, "field", None)
            raise InfoptError(f"{where}{field}: {exc}" if field else f"{where.rstrip('.')}: {exc}") from None
        raise


def option_type(config: type, name: str) -> Any:
    return typing.get_type_hints(config)[name]


def _check_type(where: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise InfoptError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")


def config_values(config: MethodConfig) -> dict[str, Any]:
    """Every option of a config by field name (the resolved form a recipe stores)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
