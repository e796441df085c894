"""llama2.c checkpoints to Hugging Face `LlamaForCausalLM` folders.

Layouts (from llama2.c's export.py and run.c):
- legacy (v0): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), a
  negative vocab_size meaning a separate classifier; then fp32 tensors in the order embeddings,
  attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, freq_cis_real,
  freq_cis_imag, [classifier]. Every matrix is stored as a torch Linear weight (out, in).
- versioned: uint32 magic 0x616b3432 ("ak42"), int32 version, the 7 ints, a uint8 shared-classifier
  flag, (version 2: an int32 group size), zero padding to 256 bytes. Version 1: fp32 attention
  norms, ffn norms, final norm, embeddings, wq, wk, wv, wo, w1, w2, w3, [classifier]. Version 2:
  the three norm sets in fp32, then each matrix as int8 codes followed by fp32 per-group scales
  (Q8_0, w = q * s).
llama2.c applies rotary embeddings to interleaved pairs; transformers' Llama rotates the two
halves of each head, so wq and wk rows are permuted per head (as transformers' own Llama
conversion script does).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infopt.errors import InfoptError
from infopt.formats.safetensors_io import ShardedWriter

MAGIC = 0x616B3432
HEADER_BYTES = 256


@dataclass
class Llama2cParams:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int = 0
    group_size: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class _Reader:
    def __init__(self, data: bytes, offset: int, path: Path):
        self.data, self.offset, self.path = data, offset, path

    def floats(self, *shape: int) -> torch.Tensor:
        return torch.from_numpy(self._take(np.float32, math.prod(shape)).reshape(shape).copy())

    def q80(self, group_size: int, *shape: int) -> torch.Tensor:
        count = math.prod(shape)
        if count % group_size:  # export.py groups each flattened matrix
            raise InfoptError(f"{self.path}: a {list(shape)} matrix does not split into groups of {group_size}")
        codes = self._take(np.int8, count).astype(np.float32)
        scales = self._take(np.float32, count // group_size)
        return torch.from_numpy((codes.reshape(-1, group_size) * scales[:, None]).reshape(shape))

    def _take(self, dtype, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.offset + size > len(self.data):
            raise InfoptError(f"{self.path} is truncated: weights end past the file size")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += size
        return out


def read_params(data: bytes, path: Path) -> tuple[Llama2cParams, int]:
    if len(data) < 28:
        raise InfoptError(f"{path} is too short to be a llama2.c checkpoint")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == MAGIC:
        if len(data) < HEADER_BYTES:
            raise InfoptError(f"{path} is truncated inside its header")
        (version,) = struct.unpack_from("<i", data, 4)
        if version not in (1, 2):
            raise InfoptError(f"{path}: llama2.c format version {version} is not supported (1 and 2 are)")
        values = struct.unpack_from("<7i", data, 8)
        shared = bool(data[36])
        group = struct.unpack_from("<i", data, 37)[0] if version == 2 else 0
        params = Llama2cParams(*values, shared_classifier=shared, version=version, group_size=group)
        offset = HEADER_BYTES
    else:
        values = list(struct.unpack_from("<7i", data, 0))
        shared = values[5] > 0
        values[5] = abs(values[5])
        params = Llama2cParams(*values, shared_classifier=shared)
        offset = 28
    checks = [params.dim, params.hidden_dim, params.n_layers, params.n_heads, params.n_kv_heads,
              params.vocab_size, params.seq_len]
    if min(checks) <= 0 or params.dim % params.n_heads or params.n_heads % params.n_kv_heads:
        raise InfoptError(f"{path} does not look like a llama2.c checkpoint (header {checks})")
    if params.head_dim % 2:
        raise InfoptError(f"{path}: head size {params.head_dim} is odd; rotary embeddings need pairs")
    if params.version == 2 and params.group_size <= 0:
        raise InfoptError(f"{path}: group size {params.group_size} (a version 2 file needs a positive one)")
    return params, offset


def read_llama2c(path: Path) -> tuple[Llama2cParams, dict[str, torch.Tensor]]:
    """Parse a llama2.c checkpoint into llama2.c-named tensors (rotary layout untouched)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InfoptError(f"cannot read {path}: {exc.strerror}") from None
    p, offset = read_params(data, path)
    r = _Reader(data, offset, path)
    L, d, h, kv = p.n_layers, p.dim, p.hidden_dim, p.n_kv_heads * p.head_dim
    t: dict[str, torch.Tensor] = {}
    if p.version == 0:
        t["emb"] = r.floats(p.vocab_size, d)
        t["att_norm"] = r.floats(L, d)
        t["wq"], t["wk"], t["wv"], t["wo"] = r.floats(L, d, d), r.floats(L, kv, d), r.floats(L, kv, d), r.floats(L, d, d)
        t["ffn_norm"] = r.floats(L, d)
        t["w1"], t["w2"], t["w3"] = r.floats(L, h, d), r.floats(L, d, h), r.floats(L, h, d)
        t["norm"] = r.floats(d)
        r.floats(p.seq_len, p.head_dim // 2)  # freq_cis_real: recomputed by transformers
        r.floats(p.seq_len, p.head_dim // 2)  # freq_cis_imag
        if not p.shared_classifier:
            t["cls"] = r.floats(p.vocab_size, d)
    else:
        t["att_norm"], t["ffn_norm"], t["norm"] = r.floats(L, d), r.floats(L, d), r.floats(d)
        if p.version == 1:
            matrix = r.floats
        else:
            def matrix(*shape: int) -> torch.Tensor:
                return r.q80(p.group_size, *shape)
        t["emb"] = matrix(p.vocab_size, d)
        per_layer = [("wq", d, d), ("wk", kv, d), ("wv", kv, d), ("wo", d, d), ("w1", h, d), ("w2", d, h), ("w3", h, d)]
        for name, rows, cols in per_layer:
            t[name] = torch.stack([matrix(rows, cols) for _ in range(L)])
        if not p.shared_classifier:
            t["cls"] = matrix(p.vocab_size, d)
    if r.offset != len(data):
        raise InfoptError(f"{path}: {len(data) - r.offset} unexpected trailing bytes (not a llama2.c checkpoint?)")
    return p, t


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved rotary pairs to rotate-half order."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(p: Llama2cParams, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {"model.embed_tokens.weight": t["emb"], "model.norm.weight": t["norm"]}
    for i in range(p.n_layers):
        pre = f"model.layers.{i}."
        state[pre + "input_layernorm.weight"] = t["att_norm"][i]
        state[pre + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        state[pre + "self_attn.q_proj.weight"] = interleaved_to_halves(t["wq"][i], p.n_heads)
        state[pre + "self_attn.k_proj.weight"] = interleaved_to_halves(t["wk"][i], p.n_kv_heads)
        state[pre + "self_attn.v_proj.weight"] = t["wv"][i]
        state[pre + "self_attn.o_proj.weight"] = t["wo"][i]
        state[pre + "mlp.gate_proj.weight"] = t["w1"][i]
        state[pre + "mlp.down_proj.weight"] = t["w2"][i]
        state[pre + "mlp.up_proj.weight"] = t["w3"][i]
    if not p.shared_classifier:
        state["lm_head.weight"] = t["cls"]
    return {k: v.contiguous() for k, v in sorted(state.items())}


def hf_config(p: Llama2cParams) -> dict:
    # llama2.c's model.py: RMSNorm eps 1e-5, rotary theta 10000, SwiGLU, BOS 1 / EOS 2.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.dim,
        "intermediate_size": p.hidden_dim,
        "num_hidden_layers": p.n_layers,
        "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads,
        "head_dim": p.head_dim,
        "vocab_size": p.vocab_size,
        "max_position_embeddings": p.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": p.shared_classifier,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_tokenizer(sp_model: Path, out_dir: Path, max_length: int) -> None:
    """tokenizer.model plus transformers' tokenizer.json/tokenizer_config.json built from it."""
    from transformers import AutoTokenizer

    try:
        import sentencepiece

        sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    except (OSError, RuntimeError) as exc:
        raise InfoptError(f"{sp_model} is not a SentencePiece model: {str(exc).splitlines()[0]}") from None
    staging = out_dir / ".tokenizer-src"
    staging.mkdir()
    shutil.copyfile(sp_model, staging / "tokenizer.model")
    settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                "legacy": False, "model_max_length": max_length}
    (staging / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(str(staging))
    tokenizer.save_pretrained(str(out_dir))
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    shutil.rmtree(staging)
    _strip_local_keys(out_dir / "tokenizer_config.json")


def _strip_local_keys(path: Path) -> None:
    """Drop keys that describe this machine rather than the tokenizer, so outputs are reproducible."""
    settings = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        settings.pop(key, None)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def convert(src: Path, tokenizer: Path | None, out_dir: Path) -> Llama2cParams:
    """Write the HF folder into `out_dir` (which must exist and be empty)."""
    params, tensors = read_llama2c(src)
    writer = ShardedWriter(out_dir)
    for name, tensor in hf_state_dict(params, tensors).items():
        writer.add(name, tensor)
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(hf_config(params), indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        if tokenizer.suffix == ".bin":
            raise InfoptError(f"{tokenizer}: pass the SentencePiece .model file, not llama2.c's tokenizer.bin")
        write_tokenizer(tokenizer, out_dir, params.seq_len)
    return params
