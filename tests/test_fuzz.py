"""Fuzzing: hundreds of malformed inputs against quantize, eval, run, inspect and convert.

Each input must end the command with one clean `error:` line and exit code 2: no traceback, no internal error,
nothing written, the input unchanged. Inputs are real files corrupted (truncations at random offsets, flipped header
bytes, out-of-range header fields, hostile index paths, wrong quantization configs, random bytes as data, broken
llama2.c headers, code-running pickles) and configs with random out-of-range fields drawn by hypothesis.
Commands run in this process (the CLI's own `main`), so hundreds of cases take seconds.
INFOPT_FUZZ_SCALE multiplies every count (`make fuzz` runs thousands); the totals are printed at the end of the run.
"""

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tiny_models import copy_tokenizer, make_tiny_model

SCALE = max(1, int(os.environ.get("INFOPT_FUZZ_SCALE", "1")))
STATS: dict[tuple[str, str], list[int]] = {}  # (input kind, command) -> [distinct inputs, cleanly refused]
FAULTS: list[str] = []
TIMES: list[float] = []


def _settings(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def run_in_process(*args: str) -> tuple[int, str, str]:
    from infopt.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["infopt", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    items = sorted(path.rglob("*")) if path.is_dir() else [path]
    for item in items:
        if item.is_file() and not item.is_symlink():
            digest.update(str(item.relative_to(path) if path.is_dir() else item.name).encode())
            digest.update(item.read_bytes())
    return digest.hexdigest()


class Fuzzer:
    """Runs one malformed input through one command and checks the outcome."""

    def __init__(self, kind: str, command: str):
        self.kind, self.command = kind, command
        self.seen: set[str] = set()

    def check(self, case_key: bytes, args: list[str], inputs: list[Path], outputs: list[Path] = ()) -> None:
        self.seen.add(hashlib.sha256(case_key).hexdigest())
        before = {p: _digest(p) for p in inputs}
        start = time.perf_counter()
        code, out, err = run_in_process(*args)
        TIMES.append(time.perf_counter() - start)
        lines = [line for line in err.splitlines() if line.strip()]
        context = f"{self.kind}/{self.command}: {' '.join(args)[:300]}\nexit {code}\n{err[-3000:]}"
        assert code == 2, context
        assert lines and lines[-1].startswith("error: "), context
        assert "Traceback" not in err + out and "internal error" not in err, context
        for path, digest in before.items():
            assert _digest(path) == digest, f"input changed: {path}\n{context}"
        for path in outputs:
            assert not path.exists(), f"output written: {path}\n{context}"
            leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
            assert leftovers == [], f"left behind: {leftovers}\n{context}"
        entry = STATS.setdefault((self.kind, self.command), [0, 0])
        entry[0], entry[1] = len(self.seen), entry[1] + 1

    def done(self, minimum: int) -> None:
        """At least `minimum` distinct inputs (small spaces, such as the list of hostile paths, cannot grow with
        INFOPT_FUZZ_SCALE; the drawn ones do)."""
        assert len(self.seen) >= minimum, (self.kind, self.command, len(self.seen))


@pytest.fixture(scope="module")
def model(tmp_path_factory, stories_hf) -> Path:
    path = make_tiny_model("llama", tmp_path_factory.mktemp("fuzz-src") / "tiny", vocab_size=512, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return copy_tokenizer(stories_hf, path)


@pytest.fixture(scope="module")
def quantized(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-q") / "q"
    code, _, err = run_in_process("quantize", str(model), "--bits", "4", "--group-size", "32", "--asym", "--out", str(out))
    assert code == 0, err
    return out


def _workspace(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.mktemp(name)


def _commands(model: Path, out: Path) -> dict[str, list[str]]:
    return {
        "quantize": ["quantize", str(model), "--out", str(out)],
        "eval": ["eval", str(model), "--dataset", "tinystories", "--seq-len", "32", "--max-windows", "1"],
        "run": ["run", str(model), "--prompt", "Once", "--max-new-tokens", "2"],
        "inspect": ["inspect", str(model)],
    }


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


WEIGHT_COMMANDS = ("quantize", "eval", "run")


@pytest.mark.parametrize("command", WEIGHT_COMMANDS)
def test_truncated_safetensors(model, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"trunc-{command}")
    data = (model / "model.safetensors").read_bytes()
    fuzz = Fuzzer("safetensors truncated", command)

    @_settings(30)
    @given(st.integers(0, len(data) - 1))
    def case(cut):
        case_dir = _copy(model, work / "m")
        (case_dir / "model.safetensors").write_bytes(data[:cut])
        out = work / "out"
        fuzz.check(str(cut).encode(), _commands(case_dir, out)[command], [case_dir], [out])

    case()
    fuzz.done(30)


@pytest.mark.parametrize("command", WEIGHT_COMMANDS)
def test_flipped_header_bytes(model, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"flip-{command}")
    data = (model / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    header = data[8:header_end].rstrip(b" ")
    fuzz = Fuzzer("safetensors header byte flipped", command)

    @_settings(30)
    @given(st.integers(0, 8 + len(header) - 1), st.integers(1, 255))
    def case(offset, mask):
        corrupted = bytearray(data)
        corrupted[offset] ^= mask
        case_dir = _copy(model, work / "m")
        (case_dir / "model.safetensors").write_bytes(bytes(corrupted))
        out = work / "out"
        fuzz.check(f"{offset}:{mask}".encode(), _commands(case_dir, out)[command], [case_dir], [out])

    case()
    fuzz.done(25)


@pytest.fixture(scope="module")
def gguf_file(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-gguf") / "m.gguf"
    code, _, err = run_in_process("quantize", str(model), "--format", "gguf", "--gguf-type", "Q8_0", "--out", str(out))
    assert code == 0, err
    return out


@pytest.mark.parametrize("command", ["eval", "run", "convert"])
def test_flipped_gguf_structure_bytes(gguf_file, tmp_path_factory, command):
    """Flips in a GGUF file's counts and tensor descriptions (names, dimensions, types, offsets): every one is
    caught before any tensor byte is trusted. (Flips inside metadata values can leave a valid file, which is
    then read as it says.)"""
    from infopt.formats.gguf_container import read_header

    work = _workspace(tmp_path_factory, f"gguf-{command}")
    data = gguf_file.read_bytes()
    header = read_header(gguf_file)
    first = min(data.find(struct.pack("<Q", len(n)) + n.encode(), 24) for n in header.tensors)
    positions = list(range(8, 24)) + list(range(first, header.data_offset))  # (version 3 -> 2 reads the same)
    fuzz = Fuzzer("GGUF structure byte flipped", command)

    @_settings(30)
    @given(st.sampled_from(positions), st.integers(1, 255))
    def case(offset, mask):
        corrupted = bytearray(data)
        corrupted[offset] ^= mask
        path = work / "m.gguf"
        path.write_bytes(bytes(corrupted))
        out = work / "out"
        args = {"eval": _commands(path, out)["eval"], "run": _commands(path, out)["run"],
                "convert": ["convert", "gguf", str(path), "--out", str(out)]}[command]
        fuzz.check(f"{offset}:{mask}".encode(), args, [path], [out])

    case()
    fuzz.done(25)


def _header(data: bytes) -> dict:
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


def _rewrite_header(data: bytes, header: dict) -> bytes:
    old_end = 8 + struct.unpack("<Q", data[:8])[0]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[old_end:]


BAD_FIELDS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["F33", "", "float", "INT4", "U128", "F64", "I8", "BF32", None, 4])),
    st.tuples(st.just("shape"), st.one_of(st.lists(st.integers(-5, 10**6), max_size=4), st.just("64"),
                                         st.lists(st.text(max_size=3), min_size=1, max_size=2), st.just([[1]]))),
    st.tuples(st.just("data_offsets"), st.one_of(st.lists(st.integers(-10, 10**12), max_size=3), st.just(None),
                                                st.just("0,4"))),
    st.tuples(st.just("extra"), st.integers()),
    st.tuples(st.just("length"), st.sampled_from([0, 7, 2**40, 2**64 - 1, 100 * 2**20 + 1])),
    st.tuples(st.just("metadata"), st.sampled_from([{"format": "pickle"}, {"format": 1}, [], "pt", {"x": "y"}])),
)


@pytest.mark.parametrize("command", WEIGHT_COMMANDS)
def test_out_of_range_header_fields(model, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"header-{command}")
    data = (model / "model.safetensors").read_bytes()
    header = _header(data)
    names = sorted(k for k in header if k != "__metadata__")
    fuzz = Fuzzer("safetensors header field out of range", command)

    @_settings(25)
    @given(st.sampled_from(names), BAD_FIELDS)
    def case(name, change):
        field, value = change
        edited = json.loads(json.dumps(header))
        if field == "length":
            corrupted = struct.pack("<Q", value) + data[8:]
        else:
            if field == "metadata":
                edited["__metadata__"] = value
            elif field == "extra":
                edited[name]["extra"] = value
            else:
                if edited[name][field] == value:
                    return
                edited[name][field] = value
            corrupted = _rewrite_header(data, edited)
        case_dir = _copy(model, work / "m")
        (case_dir / "model.safetensors").write_bytes(corrupted)
        out = work / "out"
        fuzz.check(corrupted[:4096] + len(corrupted).to_bytes(8, "little"), _commands(case_dir, out)[command],
                   [case_dir], [out])

    case()
    fuzz.done(15)


def _valid_config(model: Path) -> dict:
    return json.loads((model / "config.json").read_text())


CONFIG_CHANGES = st.one_of(
    st.tuples(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size", "num_key_value_heads", "max_position_embeddings", "head_dim"]),
              st.one_of(st.integers(-2**40, 0), st.integers(2**25, 2**62), st.floats(allow_nan=False).map(lambda f: f + 0.5),
                        st.text(max_size=5), st.just([64]), st.booleans(), st.just({"a": 1}))),
    st.tuples(st.sampled_from(["rms_norm_eps", "rope_theta"]),
              st.one_of(st.floats(max_value=0.0), st.just(float("inf")), st.just(float("nan")), st.text(max_size=4))),
    st.tuples(st.just("model_type"), st.one_of(st.text(min_size=1, max_size=12).map(lambda t: "zz-" + t),
                                               st.integers(), st.just(None).map(lambda _: ["llama"]))),
    st.tuples(st.just("quantization_config"), st.one_of(st.text(max_size=6), st.integers(), st.just([1, 2]),
                                                         st.just({"quant_method": 3}))),
    st.tuples(st.just("tie_word_embeddings"), st.sampled_from(["yes", 1, [True]])),
    st.tuples(st.just("rope_scaling"), st.sampled_from(["linear", 2, [1.0]])),
    st.tuples(st.just("num_attention_heads"), st.sampled_from([3, 5, 7, 6])),  # 64 is not divisible by these
    st.tuples(st.just("num_key_value_heads"), st.sampled_from([3, 8, 16])),  # must divide 4
    st.tuples(st.just("__whole__"), st.sampled_from(["[]", "3", "null", '"llama"', "{", "", "\xff", '{"a": ]'])),
)


@pytest.mark.parametrize("command", ["quantize", "eval", "run", "inspect"])
def test_configs_with_out_of_range_fields(model, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"config-{command}")
    base = _valid_config(model)
    fuzz = Fuzzer("config.json field out of range", command)

    @_settings(30)
    @given(CONFIG_CHANGES)
    def case(change):
        field, value = change
        if command == "inspect" and field == "model_type" and isinstance(value, str):
            return  # inspect does arithmetic for any architecture; an unknown name with sane shapes is fine there
        case_dir = _copy(model, work / "m")
        if field == "__whole__":
            text = value
        else:
            config = dict(base)
            config[field] = value
            text = json.dumps(config)
        (case_dir / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
        out = work / "out"
        fuzz.check(text.encode("utf-8", "surrogateescape"), _commands(case_dir, out)[command], [case_dir], [out])

    case()
    fuzz.done(20)


def _bad_text(kind: str, payload: bytes) -> bytes:
    if kind == ".txt":
        return payload[:7] + b"\xff" + payload[7:]  # 0xFF never occurs in UTF-8
    if kind == ".jsonl":
        return b"{" + payload.replace(b"}", b"") + b"\n"
    return b"NOPE" + payload  # not a parquet file: no PAR1 magic


@pytest.mark.parametrize("command", ["eval", "quantize-gptq"])
def test_random_bytes_as_datasets(model, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"data-{command}")
    fuzz = Fuzzer("random bytes as a dataset", command)

    @_settings(25)
    @given(st.sampled_from([".txt", ".jsonl", ".parquet"]), st.binary(min_size=0, max_size=400))
    def case(suffix, payload):
        data = work / f"data{suffix}"
        data.write_bytes(_bad_text(suffix, payload))
        out = work / "out"
        if command == "eval":
            args = ["eval", str(model), "--dataset", str(data), "--seq-len", "32"]
        else:
            args = ["quantize", str(model), "--method", "gptq", "--calib", str(data), "--calib-seq-len", "32",
                    "--calib-samples", "2", "--out", str(out)]
        fuzz.check(suffix.encode() + data.read_bytes(), args, [model, data], [out])

    case()
    fuzz.done(20)


HOSTILE_SHARDS = ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", "/tmp/x.safetensors",
                  "model.safetensors/../../../x.safetensors", "model.bin", "", ".", "..", "link.safetensors",
                  "missing.safetensors", "model.safetensors\x00.txt"]


@pytest.mark.parametrize("command", WEIGHT_COMMANDS)
def test_index_files_with_hostile_paths(model, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"index-{command}")
    outside = work / "outside.safetensors"
    shutil.copyfile(model / "model.safetensors", outside)
    names = sorted(k for k in _header((model / "model.safetensors").read_bytes()) if k != "__metadata__")
    fuzz = Fuzzer("index with a hostile path", command)

    @_settings(15)
    @given(st.one_of(st.sampled_from(HOSTILE_SHARDS).map(lambda s: ("shard", s)),
                     st.sampled_from(["[]", "{}", '{"weight_map": []}', '{"weight_map": {"a": 1}}', "{", "nul"])
                     .map(lambda s: ("text", s))))
    def case(change):
        kind, value = change
        case_dir = _copy(model, work / "m")
        if value == "link.safetensors":
            os.symlink(outside, case_dir / "link.safetensors")
        if kind == "shard":
            text = json.dumps({"metadata": {}, "weight_map": {n: value if i == 0 else "model.safetensors"
                                                              for i, n in enumerate(names)}})
        else:
            text = value
        (case_dir / "model.safetensors.index.json").write_text(text)
        out = work / "out"
        fuzz.check(text.encode(), _commands(case_dir, out)[command], [case_dir, outside], [out])

    case()
    fuzz.done(12)


QCONFIG_CHANGES = st.one_of(
    st.tuples(st.just("quant_method"), st.sampled_from(["gguf", "", "fp8", "compressed_tensors", 7])),
    st.tuples(st.just("format"), st.sampled_from(["dense", "int-quantized", "marlin-24", None])),
    st.tuples(st.just("num_bits"), st.sampled_from([2, 3, 8, 5, "four", -4, None])),
    st.tuples(st.just("group_size"), st.sampled_from([64, 16, 0, -7, "32", 4096])),
    st.tuples(st.just("strategy"), st.sampled_from(["tensor", "block", None, "channel"])),
    st.tuples(st.just("symmetric"), st.just(True)),
    st.tuples(st.just("type"), st.sampled_from(["float", "nf4"])),
    st.tuples(st.just("config_groups"), st.sampled_from([{}, [], "x", {"group_0": {"targets": ["Linear"]}}])),
    st.tuples(st.just("drop"), st.sampled_from(["weight_scale", "weight_zero_point", "weight_shape"])),
)


@pytest.mark.parametrize("command", ["eval", "run"])
def test_quantization_configs_of_the_wrong_type(quantized, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"qconfig-{command}")
    base = _valid_config(quantized)
    fuzz = Fuzzer("quantization_config wrong", command)

    @_settings(20)
    @given(QCONFIG_CHANGES)
    def case(change):
        field, value = change
        case_dir = _copy(quantized, work / "m")
        config = json.loads(json.dumps(base))
        qconfig = config["quantization_config"]
        weights = qconfig["config_groups"]["group_0"]["weights"]
        if field in ("quant_method", "format", "config_groups"):
            qconfig[field] = value
        elif field == "drop":
            path = case_dir / "model.safetensors"
            data = path.read_bytes()
            header = _header(data)
            victim = next(k for k in sorted(header) if k.endswith("." + value))
            header[victim + "_renamed"] = header.pop(victim)
            path.write_bytes(_rewrite_header(data, header))
        else:
            weights[field] = value
        (case_dir / "config.json").write_text(json.dumps(config))
        fuzz.check(json.dumps(change, default=str).encode(), _commands(case_dir, work / "out")[command], [case_dir])

    case()
    fuzz.done(15)


def test_broken_llama2c_checkpoints(data, tmp_path_factory):
    work = _workspace(tmp_path_factory, "llama2c")
    source = data / "tinyllamas-stories260K" / "stories260K.bin"
    raw = source.read_bytes()
    fuzz = Fuzzer("llama2.c checkpoint broken", "convert")

    @_settings(40)
    @given(st.one_of(
        st.integers(0, len(raw) - 1).map(lambda n: ("cut", n)),
        st.tuples(st.integers(0, 6), st.integers(-2**31, 2**31 - 1)).map(lambda t: ("field", t)),
        st.tuples(st.integers(-3, 5), st.binary(min_size=0, max_size=300)).map(lambda t: ("versioned", t)),
    ))
    def case(change):
        kind, value = change
        if kind == "cut":
            body = raw[:value]
        elif kind == "field":
            index, number = value
            original = struct.unpack_from("<i", raw, 4 * index)[0]
            if number == original or (index == 5 and abs(number) == abs(original)):
                return
            body = raw[: 4 * index] + struct.pack("<i", number) + raw[4 * index + 4 :]
        else:
            version, tail = value
            body = struct.pack("<Ii", 0x616B3432, version) + tail
        path = work / "broken.bin"
        path.write_bytes(body)
        out = work / "out"
        fuzz.check(body, ["convert", "llama2c", str(path), "--out", str(out)], [path], [out])

    case()
    fuzz.done(30)


class _Payload:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("command", WEIGHT_COMMANDS)
def test_pickles_that_would_run_code_are_refused_even_when_allowed(model, tmp_path_factory, command):
    work = _workspace(tmp_path_factory, f"pickle-{command}")
    marker = work / "pwned"
    fuzz = Fuzzer("code-running pickle", command)
    payloads = [(os.system, (f"touch {marker}",)), (exec, (f"open({str(marker)!r}, 'w')",)),
                (eval, (f"open({str(marker)!r}, 'w')",)), (shutil.copyfile, (__file__, str(marker))),
                (open, (str(marker), "w"))]
    for i, (call, args) in enumerate(payloads):
        case_dir = work / f"m{i}"
        shutil.copytree(model, case_dir)
        (case_dir / "model.safetensors").unlink()
        with open(case_dir / "pytorch_model.bin", "wb") as handle:
            pickle.dump({"model.embed_tokens.weight": _Payload(call, args)}, handle)
        out = work / "out"
        fuzz.check(f"{i}".encode(), [*_commands(case_dir, out)[command], "--allow-pickle"], [case_dir], [out])
        assert not marker.exists(), "a pickle ran code"
    fuzz.done(4)


def test_fuzz_totals():
    """Runs last in this file: prints the totals (and checks the floor) for the cases above."""
    if not STATS:
        pytest.skip("run the whole file for the totals")
    total = sum(seen for seen, _ in STATS.values())
    refused = sum(n for _, n in STATS.values())
    assert total >= 300, total
    assert refused >= total


def fuzz_report() -> list[str]:
    """Lines for the terminal summary (tests/conftest.py) and the RELIABILITY table."""
    if not STATS:
        return []
    total = sum(seen for seen, _ in STATS.values())
    lines = [f"fuzz: {total} distinct malformed inputs, every one refused with one error line, exit 2, nothing "
             f"written, input unchanged ({sum(TIMES):.1f} s in the commands)"]
    for (kind, command), (seen, _) in sorted(STATS.items()):
        lines.append(f"  {kind:40s} {command:14s} {seen:5d}")
    return lines
