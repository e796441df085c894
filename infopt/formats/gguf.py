"""GGUF, llama.cpp's single-file format: writer and reader of whole models.

What goes where is llama.cpp's (convert_hf_to_gguf.py for names and metadata, src/llama-quant.cpp for the types of
a mixture, ggml-common.h for the blocks; llama-cpp-python 0.3.36's vendored copy). A calibrated method's integer
grid is stored as it is wherever a ggml block holds it: symmetric int4 with groups of a multiple of 32 -> Q4_0 (the
scale repeated per block of 32), asymmetric int4 -> Q4_1 (the zero point folded into the block's min), symmetric
int8 -> Q8_0. Every tensor whose bytes are not exactly the method's grid is reported, with the reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from infopt.errors import InfoptError
from infopt.formats import ggml_quants as ggml
from infopt.formats.gguf_container import GGUFWriter, f32, read_header, string, u32
from infopt.formats.gguf_vocab import vocab_metadata
from infopt.quant.kgrid import KGridWeight
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import BlockWeight, QuantizedWeight

QUANT_METHOD = "gguf"
QUANTIZATION_VERSION = 2  # general.quantization_version of current llama.cpp files

# --gguf-type: llama-quantize's names -> (enum llama_ftype in llama.h, the base ggml type of the mixture)
FILE_TYPES = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"), "Q8_0": (7, "Q8_0"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize accepts them
GRID_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # file types a calibrated method's integer grid is written into exactly


def resolve_file_type(name: str) -> str:
    key = ALIASES.get(name.upper(), name.upper())
    if key not in FILE_TYPES:
        raise InfoptError(f"invalid --gguf-type {name!r}: choose one of {', '.join([*FILE_TYPES, *ALIASES])}")
    return key


K_GRID_TYPES = ("Q4_K_S", "Q4_K_M")  # mixtures whose base grid (Q4_K) a method can quantize against


def grid_spec(file_type: str, group_size: int, grids: tuple[str, ...] = ()) -> QuantSpec:
    """The grid a calibrated method quantizes against: for a Q4_0 / Q4_1 / Q8_0 file the block's bits and symmetry
    (groups of the method's size where it is a multiple of 32, else 32); for Q4_K_S / Q4_K_M, methods that know
    the K-quant grid (`grids`) quantize on it, asymmetric groups of 32 (infopt.quant.kgrid)."""
    if file_type in K_GRID_TYPES and "Q4_K" in grids:
        return QuantSpec(4, 32, False)
    if file_type not in GRID_TYPES:
        which = "Q4_K_S, Q4_K_M with --method gptq or awq, " if file_type in K_GRID_TYPES else ""
        raise InfoptError(f"calibrated methods write GGUF as {which}{', '.join(GRID_TYPES)} (their grid stored "
                          f"exactly); {file_type} is written from full precision: use --method rtn (optionally with "
                          "--calib for an importance matrix)")
    group = group_size if group_size != -1 and group_size % ggml.QK == 0 else ggml.QK
    return QuantSpec(8 if file_type == "Q8_0" else 4, group, file_type != "Q4_1")


def on_grid_modules(items: list[tuple[str, tuple[int, int]]], *, config: dict, adapter, file_type: str) -> set[str]:
    """Of the linears (module name, shape), those a Q4_K_* mixture gives its base type Q4_K: the ones a method on the
    K grid quantizes; the mixture's others (more bits for attn_v / ffn_down, fallbacks) are written from full
    precision at their own type."""
    from infopt.models.loading import text_config

    text = text_config(config)
    names = _Names.build(adapter, text)
    layers = int(text["num_hidden_layers"])
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    chosen = set()
    for module, shape in items:
        gguf_name = names.to_gguf.get(f"{module}.weight", "")
        match = re.match(r"blk\.(\d+)\.", gguf_name)
        kind, _ = tensor_type(gguf_name, shape[1], file_type, int(match.group(1)) if match else None, layers, tied)
        if kind == "Q4_K":
            chosen.add(module)
    return chosen


# --- which type each tensor gets ------------------------------------------------------------------------------


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    match = re.match(r"blk\.\d+\.(\w+)\.weight$", name)
    return match.group(1) if match else "other"


def _more_bits(layer: int, layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def fallback(type_name: str, columns: int) -> tuple[str, str | None]:
    """llama-quant.cpp's tensor_type_fallback: a row that does not split into the type's blocks."""
    if columns % ggml.TYPES[type_name].block == 0:
        return type_name, None
    alternative = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(type_name, type_name)
    if columns % ggml.TYPES[alternative].block:
        alternative = "F16"
    return alternative, f"{columns} columns do not split into {type_name} blocks: {alternative}"


def tensor_type(name: str, columns: int, file_type: str, layer: int | None, layers: int, tied: bool,
                imatrix: bool = False) -> tuple[str, str | None]:
    """The ggml type of one 2-D weight in a `file_type` file, following llama-quant.cpp's
    llama_tensor_get_type_impl for the mixtures infopt writes (no MoE, no 70B-specific rule), then its fallback."""
    base = FILE_TYPES[file_type][1]
    if base in ggml.FLOAT_TYPES:
        return base, None
    category = _category(name)
    chosen = base
    if category == "output" or (tied and category == "token_embd"):
        # the output matrix (or the shared embedding) gets Q6_K, Q8_0 where rows do not split into the base blocks
        if columns % ggml.TYPES[base].block:
            chosen = "Q8_0"
        elif base != "Q8_0":
            chosen = "Q6_K"
    elif layer is not None and category == "attn_v":
        if file_type in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, layers):
            chosen = "Q6_K"
        elif file_type == "Q4_K_S" and layer < 4:
            chosen = "Q5_K"
    elif layer is not None and category == "ffn_down":
        if file_type in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, layers):
            chosen = "Q6_K"
        elif file_type == "Q4_K_S" and layer < layers // 8:
            chosen = "Q5_K"
        elif file_type in ("Q4_0", "Q5_0") and imatrix and layer < layers // 8:
            chosen = "Q4_1" if file_type == "Q4_0" else "Q5_1"
    elif category == "attn_qkv":
        chosen = {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(file_type, chosen)
    return fallback(chosen, columns)


# --- names and layouts ----------------------------------------------------------------------------------------


@dataclass
class _Names:
    to_gguf: dict[str, str]
    permuted: dict[str, int]  # HF tensor name -> heads of its row permutation

    @classmethod
    def build(cls, adapter, text: dict) -> "_Names":
        layout = adapter.gguf
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        mapping = {f"{adapter.embed}.weight": "token_embd.weight", f"{adapter.final_norm}.weight": "output_norm.weight",
                   f"{adapter.lm_head}.weight": "output.weight"}
        permuted: dict[str, int] = {}
        for i in range(int(text["num_hidden_layers"])):
            for hf, gg in layout.names:
                for suffix in ("weight", "bias"):
                    mapping[f"{adapter.layers}.{i}.{hf}.{suffix}"] = f"blk.{i}.{gg}.{suffix}"
            if layout.permute_qk:
                for suffix in ("weight", "bias"):
                    permuted[f"{adapter.layers}.{i}.self_attn.q_proj.{suffix}"] = heads
                    permuted[f"{adapter.layers}.{i}.self_attn.k_proj.{suffix}"] = kv_heads
        return cls(mapping, permuted)


def _permute(x: torch.Tensor, heads: int) -> torch.Tensor:
    rows = x.shape[0]
    return x.reshape(heads, 2, rows // heads // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _unpermute(x: torch.Tensor, heads: int) -> torch.Tensor:
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _permute_weight(w, heads: int, inverse: bool = False):
    op = _unpermute if inverse else _permute
    if isinstance(w, KGridWeight):  # rows move with all their super-block scales
        return KGridWeight(op(w.codes, heads), op(w.d, heads), op(w.dmin, heads), op(w.sc, heads), op(w.mn, heads),
                           w.nmax)
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(op(w.codes, heads), op(w.scale, heads), None if w.zero is None else op(w.zero, heads),
                               w.spec, w.g_idx)
    if isinstance(w, BlockWeight):
        return BlockWeight(codes=op(w.codes, heads), scale=op(w.scale, heads), bits=w.bits, low=w.low,
                           offset=None if w.offset is None else op(w.offset, heads))
    return op(w, heads)


# --- metadata -------------------------------------------------------------------------------------------------


def _rope(text: dict) -> tuple[float, dict | None]:
    params = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), dict) else {}
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    scaling = text.get("rope_scaling") if isinstance(text.get("rope_scaling"), dict) else None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling


def _llama3_factors(text: dict, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency scaling as llama.cpp takes it: one divisor per rotary frequency (the rope_freqs
    tensor), from Meta's reference formula (factor, low/high frequency factors, original context)."""
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    theta, _ = _rope(text)
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def model_metadata(arch: str, text: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """{arch}.* keys, and extra tensors the metadata implies (rope_freqs for Llama 3 scaling)."""
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    theta, scaling = _rope(text)
    meta = {
        f"{arch}.context_length": u32(text.get("max_position_embeddings") or 2048),
        f"{arch}.embedding_length": u32(hidden),
        f"{arch}.block_count": u32(text["num_hidden_layers"]),
        f"{arch}.feed_forward_length": u32(text["intermediate_size"]),
        f"{arch}.attention.head_count": u32(heads),
        f"{arch}.attention.head_count_kv": u32(text.get("num_key_value_heads") or heads),
        f"{arch}.attention.layer_norm_rms_epsilon": f32(text.get("rms_norm_eps", 1e-6)),
        f"{arch}.rope.freq_base": f32(theta),
        f"{arch}.rope.dimension_count": u32(head_dim),
        f"{arch}.vocab_size": u32(text["vocab_size"]),
    }
    if head_dim != hidden // heads:
        meta[f"{arch}.attention.key_length"] = u32(head_dim)
        meta[f"{arch}.attention.value_length"] = u32(head_dim)
    if arch in ("gemma", "gemma2"):  # llama.cpp reads the head size of these from the keys alone
        meta[f"{arch}.attention.key_length"] = u32(head_dim)
        meta[f"{arch}.attention.value_length"] = u32(head_dim)
    if arch == "gemma2":
        # llama.cpp's gemma2 graph scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for its 46-layer
        # 27B (src/models/gemma2.cpp): other query_pre_attn_scalar values have no GGUF key
        scalar = text.get("query_pre_attn_scalar", head_dim)
        implied = hidden // heads if int(text["num_hidden_layers"]) == 46 else head_dim
        if scalar != implied:
            raise InfoptError(f"gemma2 query_pre_attn_scalar {scalar}: llama.cpp scales queries by 1/sqrt({implied}) "
                              "for this shape, and GGUF has no key to say otherwise")
        meta[f"{arch}.attn_logit_softcapping"] = f32(text.get("attn_logit_softcapping") or 0.0)
        meta[f"{arch}.final_logit_softcapping"] = f32(text.get("final_logit_softcapping") or 0.0)
        meta[f"{arch}.attention.sliding_window"] = u32(text.get("sliding_window") or 0)
    if arch == "phi3":  # convert_hf_to_gguf.py's Phi3MiniModel: 0 marks "no sliding window"
        meta[f"{arch}.rope.scaling.original_context_length"] = u32(
            text.get("original_max_position_embeddings") or text.get("max_position_embeddings") or 2048)
        meta[f"{arch}.attention.sliding_window"] = u32(text.get("sliding_window") or 0)
        rotary = float(text.get("partial_rotary_factor") or 1.0)
        meta[f"{arch}.rope.dimension_count"] = u32(int(rotary * hidden) // heads)
    extra: dict[str, torch.Tensor] = {}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            meta[f"{arch}.rope.scaling.type"] = string("linear")
            meta[f"{arch}.rope.scaling.factor"] = f32(scaling["factor"])
        elif kind == "yarn":
            meta[f"{arch}.rope.scaling.type"] = string("yarn")
            meta[f"{arch}.rope.scaling.factor"] = f32(scaling["factor"])
            meta[f"{arch}.rope.scaling.original_context_length"] = u32(
                scaling.get("original_max_position_embeddings") or text.get("max_position_embeddings"))
        elif kind == "llama3":
            extra["rope_freqs.weight"] = _llama3_factors(text, scaling)
        elif kind not in (None, "default"):
            raise InfoptError(f"rope scaling {kind!r} has no GGUF equivalent infopt writes (linear, yarn, llama3)")
    return meta, extra


# --- writing --------------------------------------------------------------------------------------------------


@dataclass
class WriteReport:
    tensors: list[dict] = field(default_factory=list)  # name, type, shape, how ("exact", "quantized", ...)
    files: list[str] = field(default_factory=list)  # the file names written (the shards of a split model, in order)

    def count(self, how: str) -> int:
        return sum(1 for t in self.tensors if t["how"] == how)

    def types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t["type"]] = counts.get(t["type"], 0) + 1
        return dict(sorted(counts.items()))


def _grid_type(w: QuantizedWeight) -> str | None:
    if w.g_idx is not None or (w.spec.group_size != -1 and w.spec.group_size % ggml.QK):
        return None
    if w.spec.bits == 4:
        return "Q4_0" if w.zero is None else "Q4_1"
    if w.spec.bits == 8 and w.zero is None:
        return "Q8_0"
    return None


def _per_block(values: torch.Tensor, spec: QuantSpec, columns: int) -> torch.Tensor:
    """[rows, groups] -> [rows, columns / 32], each group's value repeated over its blocks."""
    width = columns if spec.group_size == -1 else spec.group_size
    return values.repeat_interleave(width // ggml.QK, dim=1)


def _grid_scales(w: QuantizedWeight, type_name: str):
    """Per-block d (and m for Q4_1) of a method's grid, and whether they are exactly the method's (fp16-exact)."""
    columns = w.codes.shape[1]
    scale = _per_block(w.scale.to(torch.float32), w.spec, columns)
    d = scale.to(torch.float16).to(torch.float32)
    exact = bool(torch.equal(d, scale))
    if type_name != "Q4_1":
        return d, None, exact
    # Q4_1: x = d * n + m with n = code + 8 in 0..15, so m = -scale * (8 + zero)
    m = -scale * (8 + _per_block(w.zero.to(torch.float32), w.spec, columns))
    m16 = m.to(torch.float16).to(torch.float32)
    return d, m16, exact and bool(torch.equal(m16, m))


def pack_grid(w: QuantizedWeight, type_name: str) -> torch.Tensor:
    """A method's integer grid as ggml blocks (scales rounded to fp16 where they are not already)."""
    d, m, _ = _grid_scales(w, type_name)
    if type_name == "Q4_0":
        return ggml.pack_q4_0(w.codes, d)
    if type_name == "Q8_0":
        return ggml.pack_q8_0(w.codes, d)
    return ggml.pack_q4_1(w.codes.to(torch.int16) + 8, d, m)


def _placed(items, adapter, names: "_Names", tied: bool):
    """(HF name, GGUF name, value in llama.cpp's layout, layer or None) of every tensor the file holds: the tied
    lm_head and persisted rotary buffers are left out, q/k rows permuted, 1 + w norms offset."""
    for hf_name, value in items:
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == f"{adapter.lm_head}.weight" and tied):
            continue
        gguf_name = names.to_gguf.get(hf_name)
        if gguf_name is None:
            raise InfoptError(f"tensor {hf_name} has no place in a {adapter.gguf.arch} GGUF file")
        if hf_name in names.permuted:
            value = _permute_weight(value, names.permuted[hf_name])
        if adapter.norm_offset and gguf_name.endswith("norm.weight"):
            value = value.to(torch.float32) + adapter.norm_offset  # llama.cpp multiplies by the weight itself
        match = re.match(r"blk\.(\d+)\.", gguf_name)
        yield hf_name, gguf_name, value, int(match.group(1)) if match else None


def write_model(path: Path, items: Iterable[tuple[str, object]], *, config: dict, adapter, tokenizer_dir: Path,
                file_type: str, name: str, provenance: dict, imatrix: dict[str, torch.Tensor] | None = None,
                max_shard_bytes: int | None = None) -> WriteReport:
    """Write a whole model as one GGUF file; items are (Hugging Face tensor name, tensor or QuantizedWeight) in any
    order, as the quantize workflow streams them. With max_shard_bytes: llama.cpp's split files beside `path`
    instead (gguf_container.GGUFWriter)."""
    from infopt import __version__
    from infopt.models.loading import text_config

    if adapter.gguf is None:
        raise InfoptError(f"GGUF export of {adapter.name} is not supported yet")
    text = text_config(config)
    arch = adapter.gguf.arch
    names = _Names.build(adapter, text)
    layers = int(text["num_hidden_layers"])
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    writer = GGUFWriter(path, max_shard_bytes=max_shard_bytes)
    report = WriteReport()
    try:
        writer.add("general.architecture", string(arch))
        writer.add("general.name", string(name))
        writer.add("general.file_type", u32(FILE_TYPES[file_type][0]))
        writer.add("general.quantization_version", u32(QUANTIZATION_VERSION))
        writer.add("general.quantized_by", string(f"infopt {__version__}"))
        writer.add("infopt.settings", string(json.dumps(provenance, sort_keys=True, default=str)))
        source = {k: v for k, v in config.items() if k != "quantization_config"}
        writer.add("infopt.source_config", string(json.dumps(source, sort_keys=True)))
        meta, extra = model_metadata(arch, text)
        for key, value in meta.items():
            writer.add(key, value)
        for key, value in vocab_metadata(tokenizer_dir, text, int(text["vocab_size"])).items():
            writer.add(key, value)
        for key, tensor in extra.items():
            writer.add_tensor(key, tuple(tensor.shape), "F32", tensor)
            report.tensors.append({"name": key, "type": "F32", "shape": list(tensor.shape), "how": "metadata"})
        for hf_name, gguf_name, value, layer in _placed(items, adapter, names, tied):
            _add(writer, report, gguf_name, value, file_type, layer, layers, tied,
                 None if imatrix is None else imatrix.get(hf_name))
        writer.close()
        report.files = [p.name for p in writer.paths]
    except BaseException:
        writer.abort()
        raise
    return report


def decide(name: str, value, file_type: str, layer: int | None, layers: int, tied: bool,
           importance: bool = False) -> tuple[str, str, str | None]:
    """(ggml type, how the bytes come about, fallback note) of one tensor: what the writer does and what
    `--dry-run` reports. A method's grid goes in as it is where a block holds it; everything else is rounded."""
    if isinstance(value, KGridWeight):
        return "Q4_K", "exact", None
    if isinstance(value, QuantizedWeight):
        rows, cols = value.shape
        grid = _grid_type(value)
        if grid is not None and cols % ggml.QK == 0:
            exact = _grid_scales(value, grid)[2]
            return grid, "exact" if exact else "grid, scales rounded to fp16", None
        how = f"re-rounded (its grid or {cols} columns fit no ggml block)"
    else:
        how = "quantized"
        if value.dim() == 1 or name == "rope_freqs.weight":
            return "F32", "float", None
        cols = value.shape[1]
    type_name, note = tensor_type(name, cols, file_type, layer, layers, tied, importance)
    if type_name in ggml.FLOAT_TYPES and how == "quantized":
        how = "float"
    return type_name, how, note


def _add(writer: GGUFWriter, report: WriteReport, name: str, value, file_type: str, layer: int | None,
         layers: int, tied: bool, importance: torch.Tensor | None) -> None:
    type_name, how, note = decide(name, value, file_type, layer, layers, tied, importance is not None)
    if isinstance(value, KGridWeight):
        data, shape = ggml.pack_q4_k(value.codes, value.d, value.dmin, value.sc, value.mn), value.shape
    elif isinstance(value, QuantizedWeight) and how in ("exact", "grid, scales rounded to fp16"):
        data = pack_grid(value, type_name)
        shape = value.shape
    else:
        tensor = value.dequantize() if isinstance(value, QuantizedWeight) else value
        tensor = tensor.to(torch.float32)
        shape = tuple(tensor.shape)
        data = ggml.quantize(type_name, tensor, importance if type_name not in ggml.FLOAT_TYPES else None)
    writer.add_tensor(name, tuple(shape), type_name, data)
    report.tensors.append({"name": name, "type": type_name, "shape": list(shape), "how": how,
                           **({"fallback": note} if note else {})})


def plan_model(items, *, config: dict, adapter, file_type: str, importance: bool = False) -> list[dict]:
    """What write_model would do with each tensor, writing nothing (`infopt convert --dry-run`)."""
    from infopt.models.loading import text_config

    text = text_config(config)
    names = _Names.build(adapter, text)
    layers = int(text["num_hidden_layers"])
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    rows = []
    for hf_name, gguf_name, value, layer in _placed(items, adapter, names, tied):
        kind, how, note = decide(gguf_name, value, file_type, layer, layers, tied, importance)
        rows.append({"name": gguf_name, "source": hf_name, "type": kind, "how": how,
                     **({"fallback": note} if note else {})})
    return rows


# --- reading --------------------------------------------------------------------------------------------------

_MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                "qwen3": ("qwen3", "Qwen3ForCausalLM")}


def _number(meta: dict, key: str, kind=int, default=None):
    value = meta.get(key, default)
    if value is None:
        raise InfoptError(f"the GGUF file lacks {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InfoptError(f"{key} is {value!r}, not a number")
    return kind(value)


def model_config(path: Path, header=None) -> dict:
    """A config.json dict for a GGUF file: the source config infopt recorded, or one built from llama.cpp's
    keys for files from other writers. The file's tensors are checked against it when read."""
    header = header or read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    recorded = meta.get("infopt.source_config")
    if arch not in _MODEL_TYPES and not (arch in ("gemma", "gemma2", "phi3") and isinstance(recorded, str)):
        raise InfoptError(f"{path}: GGUF architecture {str(arch)[:40]!r} is not readable yet "
                          f"(readable: {', '.join(_MODEL_TYPES)}, and gemma/gemma2/phi3 files infopt wrote)")
    if isinstance(recorded, str):
        try:
            config = json.loads(recorded)
        except json.JSONDecodeError:
            raise InfoptError(f"{path}: infopt.source_config is not valid JSON") from None
        if not isinstance(config, dict):
            raise InfoptError(f"{path}: infopt.source_config is not a JSON object")
    else:
        if "rope_freqs.weight" in header.tensors:
            raise InfoptError(f"{path}: Llama 3 rope factors from a foreign GGUF file are not readable yet")
        model_type, architecture = _MODEL_TYPES[arch]
        heads = _number(meta, f"{arch}.attention.head_count")
        hidden = _number(meta, f"{arch}.embedding_length")
        embed = header.tensors.get("token_embd.weight")
        vocab = len(meta.get("tokenizer.ggml.tokens") or []) or (embed.shape[0] if embed else 0)
        config = {
            "model_type": model_type, "architectures": [architecture], "hidden_size": hidden,
            "num_hidden_layers": _number(meta, f"{arch}.block_count"),
            "intermediate_size": _number(meta, f"{arch}.feed_forward_length"),
            "num_attention_heads": heads,
            "num_key_value_heads": _number(meta, f"{arch}.attention.head_count_kv", default=heads),
            "rms_norm_eps": _number(meta, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-6),
            "rope_theta": _number(meta, f"{arch}.rope.freq_base", float, 10000.0),
            "max_position_embeddings": _number(meta, f"{arch}.context_length", default=2048),
            "vocab_size": vocab, "head_dim": _number(meta, f"{arch}.attention.key_length", default=hidden // heads),
            "tie_word_embeddings": "output.weight" not in header.tensors, "torch_dtype": "float32",
        }
        for key in ("bos", "eos", "padding"):
            value = meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(value, int):
                config["pad_token_id" if key == "padding" else f"{key}_token_id"] = value
        scaling = meta.get(f"{arch}.rope.scaling.type")
        if scaling in ("linear", "yarn"):
            config["rope_scaling"] = {"rope_type": scaling,
                                      "factor": _number(meta, f"{arch}.rope.scaling.factor", float)}
    config["quantization_config"] = {"quant_method": QUANT_METHOD,
                                     "file_type": meta.get("general.file_type")}
    return config


def read_quantized(files: list[Path], qconfig: dict) -> tuple[dict[str, QuantizedWeight | BlockWeight],
                                                             dict[str, torch.Tensor]]:
    """Hugging Face names -> weights: every block type's linear as an integer grid the runtime computes from
    directly (Q4_0 and Q8_0 as QuantizedWeight: symmetric int4 / int8 groups of 32 with a float scale, the grid the
    folder formats share; Q4_1, Q5_0, Q5_1 and the K-quants as BlockWeight, steps and offsets per block of 32 or
    16); the token embedding and float tensors dequantized to float32."""
    from infopt.models.adapters import adapter_for
    from infopt.models.loading import architecture_shapes, text_config

    path = files[0]
    header = read_header(path)
    config = model_config(path, header)
    adapter = adapter_for(text_config(config))
    text = text_config(config)
    names = _Names.build(adapter, text)
    to_hf = {g: h for h, g in names.to_gguf.items()}
    expected, tied, _ = architecture_shapes(config)
    quantized: dict[str, QuantizedWeight] = {}
    dense: dict[str, torch.Tensor] = {}
    for gguf_name, info in header.tensors.items():
        if gguf_name == "rope_freqs.weight":
            continue
        hf_name = to_hf.get(gguf_name)
        if hf_name is None or hf_name not in expected:
            raise InfoptError(f"{path}: tensor {gguf_name[:60]!r} has no place in a {adapter.name} model")
        if tuple(info.shape) != expected[hf_name]:
            raise InfoptError(f"{path}: tensor {gguf_name} is {list(info.shape)}, the metadata implies "
                              f"{list(expected[hf_name])}")
        raw = header.tensor_bytes(info)
        rows, cols = (info.shape if len(info.shape) == 2 else (1, info.shape[0]))
        if info.type in ggml.CODE_BITS and len(info.shape) == 2 and gguf_name != "token_embd.weight":
            # a linear's matrix (the embedding is a lookup table, and a foreign file's 1-D blocks stay dense)
            weight = _grid_weight(info.type, raw, rows, cols)
            quantized[hf_name] = _permute_weight(weight, names.permuted[hf_name], inverse=True) \
                if hf_name in names.permuted else weight
            continue
        values = ggml.dequantize(info.type, raw, rows, cols).reshape(info.shape)
        if adapter.norm_offset and gguf_name.endswith("norm.weight"):
            values = values - adapter.norm_offset
        dense[hf_name] = _unpermute(values, names.permuted[hf_name]) if hf_name in names.permuted else values
    missing = sorted(k for k in expected if k not in quantized and k not in dense
                     and not (tied and k == f"{adapter.lm_head}.weight"))
    if missing:
        raise InfoptError(f"{path}: tensors missing from the GGUF file: {', '.join(missing[:3])}")
    return quantized, dense


def _grid_weight(type_name: str, raw: torch.Tensor, rows: int, cols: int) -> QuantizedWeight | BlockWeight:
    blocks = ggml.unpack_blocks(type_name, raw, rows, cols)
    if type_name in ("Q4_0", "Q8_0"):
        return QuantizedWeight(blocks.codes, blocks.scale, None, QuantSpec(blocks.bits, ggml.QK, True))
    return blocks


def tensor_type_counts(header) -> dict[str, int]:
    """How many tensors of each ggml type a file holds."""
    counts: dict[str, int] = {}
    for info in header.tensors.values():
        counts[info.type] = counts.get(info.type, 0) + 1
    return dict(sorted(counts.items()))
