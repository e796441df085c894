"""Tokenizers in GGUF: written from a Hugging Face folder, read back as a transformers tokenizer.

Two kinds, as llama.cpp reads them (its `llama-vocab.cpp`, and the keys of gguf-py's constants):
- "llama" (SentencePiece): tokenizer.ggml.tokens, .scores and .token_type, straight from tokenizer.model. Token
  types are SentencePiece's piece types, which llama.cpp numbers the same way (1 normal, 2 unknown, 3 control,
  4 user-defined, 5 unused, 6 byte).
- "gpt2" (byte-level BPE): tokens by id, merges, and the pre-tokenizer name. llama.cpp recognizes pre-tokenizers
  by hashing the tokens of a check text (convert_hf_to_gguf.py, get_vocab_base_pre); infopt names them by model
  type instead: qwen2 for Qwen2/Qwen3, llama-bpe for Llama 3, default otherwise.
The whole tokenizer.json also goes in, under the spec's `tokenizer.huggingface.json` key, so infopt (and any
transformers user) reads back the exact tokenizer the model was trained with.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from infopt.errors import InfoptError
from infopt.formats.gguf_container import Typed, ValueType, array, boolean, string, u32

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_PRE_BY_MODEL_TYPE = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece model file (ModelProto field 1: piece = 1,
    score = 2, type = 3)."""
    try:
        data = path.read_bytes()
        pieces = []
        for number, wire, value in _fields(data):
            if number != 1 or wire != 2:
                continue
            piece, score, kind = "", 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InfoptError(f"{path}: not a readable SentencePiece model ({exc})") from None
    if not pieces:
        raise InfoptError(f"{path}: a SentencePiece model with no pieces")
    return pieces


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InfoptError(f"{path} is not valid JSON") from None
    return config if isinstance(config, dict) else {}


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def vocab_metadata(folder: Path, model_config: dict, vocab_size: int) -> dict[str, Typed]:
    """The tokenizer.* keys for a Hugging Face model folder."""
    tok_config = _tokenizer_config(folder)
    meta: dict[str, Typed] = {}
    spm = folder / "tokenizer.model"
    tok_json = folder / "tokenizer.json"
    hf_json = tok_json.read_text() if tok_json.is_file() else None
    if spm.is_file():
        pieces = sentencepiece_pieces(spm)
        tokens = [p for p, _, _ in pieces]
        scores = [s for _, s, _ in pieces]
        types = [t if t in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL for _, _, t in pieces]
        meta["tokenizer.ggml.model"] = string("llama")
        meta["tokenizer.ggml.pre"] = string("default")
        for token_id, (content, special) in _added_tokens(hf_json).items():
            if token_id < len(tokens) and types[token_id] == NORMAL:  # tokens added on top of the SentencePiece set
                tokens[token_id] = content
                types[token_id] = CONTROL if special else USER_DEFINED
    elif hf_json is not None:
        tokens, types, merges = _bpe_vocab(hf_json, tok_json)
        scores = None
        meta["tokenizer.ggml.model"] = string("gpt2")
        meta["tokenizer.ggml.pre"] = string(_PRE_BY_MODEL_TYPE.get(model_config.get("model_type"), "default"))
        meta["tokenizer.ggml.merges"] = array(ValueType.STRING, merges)
    else:
        raise InfoptError(f"{folder}: no tokenizer.model or tokenizer.json to put in the GGUF file")
    if len(tokens) > vocab_size:
        raise InfoptError(f"{folder}: the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size}")
    for token_id in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (padding)
        tokens.append(f"[PAD{token_id}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    meta["tokenizer.ggml.tokens"] = array(ValueType.STRING, tokens)
    if scores is not None:
        meta["tokenizer.ggml.scores"] = array(ValueType.FLOAT32, scores)
    meta["tokenizer.ggml.token_type"] = array(ValueType.INT32, types)
    ids = {"bos": model_config.get("bos_token_id"), "eos": model_config.get("eos_token_id"),
           "padding": model_config.get("pad_token_id")}
    if spm.is_file():
        unknown = [i for i, t in enumerate(types) if t == UNKNOWN]
        ids["unknown"] = unknown[0] if unknown else None
    for name, value in ids.items():
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size:
            meta[f"tokenizer.ggml.{name}_token_id"] = u32(value)
    meta["tokenizer.ggml.add_bos_token"] = boolean(bool(tok_config.get("add_bos_token", spm.is_file())))
    meta["tokenizer.ggml.add_eos_token"] = boolean(bool(tok_config.get("add_eos_token", False)))
    template = _chat_template(folder, tok_config)
    if template:
        meta["tokenizer.chat_template"] = string(template)
    if hf_json is not None:
        meta["tokenizer.huggingface.json"] = string(hf_json)
    return meta


def _added_tokens(hf_json: str | None) -> dict[int, tuple[str, bool]]:
    if hf_json is None:
        return {}
    try:
        data = json.loads(hf_json)
    except json.JSONDecodeError:
        raise InfoptError("tokenizer.json is not valid JSON") from None
    return {int(t["id"]): (str(t["content"]), bool(t.get("special"))) for t in data.get("added_tokens") or []
            if isinstance(t, dict) and isinstance(t.get("id"), int) and "content" in t}


def _bpe_vocab(hf_json: str, path: Path) -> tuple[list[str], list[int], list[str]]:
    try:
        data = json.loads(hf_json)
        model = data["model"]
        if model.get("type") != "BPE":
            raise InfoptError(f"{path}: a {model.get('type')} tokenizer; GGUF export handles SentencePiece and BPE")
        vocab = dict(model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise InfoptError(f"{path}: not a tokenizer.json this export understands") from None
    added = _added_tokens(hf_json)
    size = max([*vocab.values(), *added.keys()], default=-1) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for token, token_id in vocab.items():
        tokens[token_id], types[token_id] = token, NORMAL
    for token_id, (content, special) in added.items():
        tokens[token_id], types[token_id] = content, CONTROL if special else USER_DEFINED
    return tokens, types, merges


def tokenizer_from_metadata(metadata: dict, path: Path):
    """A transformers tokenizer from a GGUF file's metadata: its embedded tokenizer.json (what infopt writes);
    files from other writers need --tokenizer pointing at the model's tokenizer folder."""
    raw = metadata.get("tokenizer.huggingface.json")
    if not isinstance(raw, str):
        raise InfoptError(f"{path} carries no Hugging Face tokenizer (tokenizer.huggingface.json); pass --tokenizer "
                          "with the model's tokenizer folder (infopt eval)")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        backend = Tokenizer.from_str(raw)
    except Exception as exc:  # the tokenizers library raises its own exception type
        raise InfoptError(f"{path}: its embedded tokenizer.json does not load ({str(exc).splitlines()[0][:120]})") \
            from None
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token(key: str):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[value] if isinstance(value, int) and 0 <= value < len(tokens) else None

    special = {k: v for k, v in {"bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
                                 "pad_token": token("padding")}.items() if v is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        tokenizer.chat_template = template
    return tokenizer
