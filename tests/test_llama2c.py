"""llama2.c conversion: the known greedy text, every file layout, and bad files."""

import struct

import numpy as np
import pytest
import torch

from infopt.errors import InfoptError
from infopt.models.llama2c import MAGIC, read_llama2c
from infopt.models.loading import load_causal_lm, load_tokenizer
from infopt.workflows import convert_llama2c
from tests.conftest import KNOWN_STORY


def _greedy(model_dir, n=64):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = load_tokenizer(model_dir)
    out = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_converted_stories260k_reproduces_the_documented_greedy_text(stories_hf):
    assert _greedy(stories_hf).startswith(KNOWN_STORY)


def test_converted_files_and_tokenizer_match_sentencepiece(stories_hf, data):
    import json

    import sentencepiece

    names = {p.name for p in stories_hf.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json"} <= names
    config = json.loads((stories_hf / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 5, 4)
    assert config["tie_word_embeddings"] is True
    sp = sentencepiece.SentencePieceProcessor(model_file=str(data / "tinyllamas-stories260K" / "tok512.model"))
    tokenizer = load_tokenizer(stories_hf)
    text = "Tom and Sue went to the park.\n\nThey saw 3 dogs!"
    assert tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(text)


def _write_versioned(path, version, params, tensors, shared=True, group=64):
    """Write llama2.c's versioned export layout from legacy-ordered tensors (test-side writer)."""
    dim, hidden, layers, heads, kv_heads, vocab, seq = params
    header = struct.pack("<Ii", MAGIC, version) + struct.pack("<7i", *params) + struct.pack("<B", int(shared))
    if version == 2:
        header += struct.pack("<i", group)
    header += b"\0" * (256 - len(header))
    body = [tensors[n].numpy().astype(np.float32).tobytes() for n in ("att_norm", "ffn_norm", "norm")]
    matrices = [tensors["emb"]] + [tensors[n][i] for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for i in range(layers)]
    for m in matrices:
        if version == 1:
            body.append(m.numpy().astype(np.float32).tobytes())
        else:
            g = m.reshape(-1, group)
            scale = g.abs().amax(1) / 127.0
            q = torch.round(g / scale[:, None]).to(torch.int8)
            body += [q.numpy().tobytes(), scale.numpy().astype(np.float32).tobytes()]
    path.write_bytes(header + b"".join(body))


@pytest.mark.parametrize("version", [1, 2])
def test_versioned_formats_convert_to_the_same_model(data, tmp_path, stories_hf, version):
    legacy = data / "tinyllamas-stories260K" / "stories260K.bin"
    params, tensors = read_llama2c(legacy)
    fields = (params.dim, params.hidden_dim, params.n_layers, params.n_heads, params.n_kv_heads,
              params.vocab_size, params.seq_len)
    src = tmp_path / f"v{version}.bin"
    _write_versioned(src, version, fields, tensors)
    out = tmp_path / "hf"
    convert_llama2c(src, data / "tinyllamas-stories260K" / "tok512.model", out)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_causal_lm(str(stories_hf))(ids).logits
        got = load_causal_lm(str(out))(ids).logits
    if version == 1:
        assert torch.equal(got, ref)
    else:  # Q8_0 weights: close, not equal
        assert not torch.equal(got, ref)
        assert torch.allclose(torch.softmax(got, -1), torch.softmax(ref, -1), atol=0.05)
        assert _greedy(out, 24).startswith("Once upon a time")


def test_separate_classifier_is_kept(data, tmp_path):
    legacy = (data / "tinyllamas-stories260K" / "stories260K.bin").read_bytes()
    params, tensors = read_llama2c(data / "tinyllamas-stories260K" / "stories260K.bin")
    header = list(struct.unpack_from("<7i", legacy, 0))
    header[5] = -header[5]
    classifier = (tensors["emb"] * 0.5).numpy().astype(np.float32).tobytes()
    src = tmp_path / "unshared.bin"
    src.write_bytes(struct.pack("<7i", *header) + legacy[28:] + classifier)
    out = tmp_path / "hf"
    convert_llama2c(src, None, out)
    model = load_causal_lm(str(out))
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, tensors["emb"] * 0.5)
    assert torch.equal(model.model.embed_tokens.weight, tensors["emb"])


def test_bad_llama2c_files_give_clear_errors(tmp_path, data):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x01\x02")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((data / "tinyllamas-stories260K" / "stories260K.bin").read_bytes()[:5000])
    for path, words in [(short, "too short"), (truncated, "truncated")]:
        with pytest.raises(InfoptError, match=words):
            convert_llama2c(path, None, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
