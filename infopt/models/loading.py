"""Find a model (local folder or hub id), check its files, and load it for evaluation or generation."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from infopt.errors import InfoptError
from infopt.formats import registry
from infopt.formats.gguf_container import is_gguf
from infopt.formats.safetensors_io import check_safetensors, weight_files
from infopt.models.adapters import expected_shapes
from infopt.validate import check_known_architecture, check_model_config

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


@dataclass
class ModelDir:
    path: Path
    config: dict
    files: list[Path]  # safetensors weights, or pickle files when explicitly allowed
    pickle: bool = False

    @property
    def quant_method(self) -> str | None:
        return (self.config.get("quantization_config") or {}).get("quant_method")

    @property
    def num_layers(self) -> int:
        return int(text_config(self.config)["num_hidden_layers"])


def text_config(config: dict) -> dict:
    return config.get("text_config", config)


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InfoptError(f"cannot read {path}: {exc.__class__.__name__}") from None
    if not isinstance(config, dict):
        raise InfoptError(f"{path} is not a JSON object")
    return config


def _download(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise InfoptError(f"{repo_id!r} is not a local path and huggingface_hub is missing") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise InfoptError(
            f"model {repo_id!r} is not a local path nor in the Hugging Face cache, and the hub cannot be reached"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InfoptError(f"cannot fetch model {repo_id!r} from the hub: {str(exc).splitlines()[0]}") from None


def locate(spec: str, config_only: bool = False, allow_pickle: bool = False) -> Path:
    """A local folder for a path or a hub id (downloaded into the normal HF cache when online)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        patterns = ["config.json"] if config_only else _HUB_FILES + (["*.bin"] if allow_pickle else [])
        return _download(spec, patterns)
    raise InfoptError(f"no such file or directory: {spec}")


def open_model(spec: str, allow_pickle: bool = False) -> ModelDir:
    """Resolve and validate a model folder: config.json present, weights safe and intact."""
    path = locate(spec, allow_pickle=allow_pickle)
    if path.is_file() and is_gguf(path):
        from infopt.formats.gguf import model_config
        from infopt.formats.gguf_container import read_header

        header = read_header(path)  # a split model's shards too, from its first
        config = check_model_config(model_config(path, header), str(path))
        return ModelDir(path, config, header.paths)
    if not path.is_dir():
        raise InfoptError(f"{path} is not a model directory (expected a folder with config.json)")
    if not (path / "config.json").is_file():
        raise InfoptError(f"{path} is not a model directory: no config.json")
    config = check_model_config(read_config(path / "config.json"), str(path / "config.json"))
    files = weight_files(path)
    if files:
        for file in files:
            check_safetensors(file)
        model = ModelDir(path, config, files)
        check_weights_match_architecture(model)
        return model
    pickles = sorted({p for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles and not allow_pickle:
        raise InfoptError(
            f"{path} holds only pickle weights ({pickles[0].name}), which can run code when loaded; "
            "pass --allow-pickle to load them anyway"
        )
    if not pickles:
        raise InfoptError(f"{path} is not a model directory: no *.safetensors weights")
    model = ModelDir(path, config, pickles, pickle=True)
    check_weights_match_architecture(model)
    return model


def architecture_shapes(config: dict) -> tuple[dict[str, tuple[int, ...]], bool, list[str]]:
    """Every tensor name and shape the architecture has, whether lm_head is tied to the embedding, and the name
    patterns transformers ignores on load (the model is built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    hf_config = hf_config_from_dict(config)
    try:
        with torch.device("meta"), quiet_transformers():
            lm = AutoModelForCausalLM.from_config(hf_config)
        expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    except Exception as exc:  # the config passed transformers' validators but the model cannot be built from it
        raise InfoptError(f"transformers cannot build a model from the config: {_first_line(exc)}") from None
    ignored = list(getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or [])
    return expected, bool(getattr(hf_config, "tie_word_embeddings", False)), ignored


def check_weights_match_architecture(model: ModelDir) -> None:
    """Every tensor the architecture has is in the files with its shape, and nothing else is. Full-precision
    checkpoints only; each format's reader checks its own packed tensors."""
    if model.quant_method or model.config.get("auto_map"):
        return
    if model.pickle:
        found = {k: tuple(v.shape) for k, v in load_state_dict(model).items()}
    else:
        found = {}
        for file in model.files:
            found.update({k: tuple(v["shape"]) for k, v in check_safetensors(file).items() if k != "__metadata__"})
    table = expected_shapes(model.config)  # the adapter table's shapes: an exact match needs no transformers model
    if table is not None and _same_tensors(found, *table):
        return
    try:
        expected, tied, ignore = architecture_shapes(model.config)
    except InfoptError as exc:
        raise InfoptError(f"{model.path}: {exc}".replace("the config:", "config.json:")) from None
    missing = sorted(k for k in expected if k not in found and not (tied and k == "lm_head.weight"))
    ignored = [re.compile(p) for p in ignore] + [re.compile(r"rotary_emb\.inv_freq$")]  # persisted by older transformers, recomputed now
    unexpected = sorted(k for k in found if k not in expected and not any(p.search(k) for p in ignored))
    wrong = sorted(k for k in expected if k in found and found[k] != expected[k])
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(k[:80] for k in unexpected[:3])}" if unexpected else "",
                 f"{wrong[0]} is {list(found[wrong[0]])}, the config implies {list(expected[wrong[0]])}" if wrong else ""]
        raise InfoptError(f"{model.path}: the weights do not match config.json: {'; '.join(p for p in parts if p)}")


def _same_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], tied: bool) -> bool:
    names = set(expected) - ({"lm_head.weight"} - set(found) if tied else set())
    return set(found) == names and all(found[k] == expected[k] for k in names)


def load_config_only(spec: str) -> dict:
    """config.json of a folder, a config file, or a hub id, without touching weights."""
    path = locate(spec, config_only=True)
    if path.is_file() and is_gguf(path):  # a GGUF file's config, from its header (a split model's first shard)
        from infopt.formats.gguf import model_config

        return check_model_config(model_config(path), str(path))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InfoptError(f"no config.json at {spec}")
    config = check_model_config(read_config(path), str(path))
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        hf_config_from_dict(config)  # transformers' own validators, for the architectures it knows
    return config


def load_state_dict(model: ModelDir) -> dict[str, torch.Tensor]:
    """All weights as plain tensors (quantized formats dequantized by their reader)."""
    if model.pickle:
        state: dict[str, torch.Tensor] = {}
        for file in model.files:
            state.update(load_pickle_weights(file))
        return state
    if model.quant_method is None:
        from infopt.formats.safetensors_io import load_tensors

        return load_tensors(model.files)
    return registry.read_dense_state_dict(model.files, model.config)


def load_pickle_weights(file: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint through torch's weights-only unpickler, which builds tensors and plain containers and
    nothing else: a pickle that would import or call anything is refused, even with --allow-pickle."""
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, OSError) as exc:
        text = str(exc)
        found = re.search(r"Unsupported (global|operand)[^\n]*", text)
        reason = found.group(0) if found else (text.strip().splitlines() or [exc.__class__.__name__])[0]
        raise InfoptError(f"refusing {file}: not a plain weights pickle (the weights-only loader stopped: "
                          f"{reason[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InfoptError(f"refusing {file}: expected a mapping of tensor names to tensors")
    return state


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings about a config's details (token ids, defaults) while infopt only inspects it."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def hf_config_from_dict(config: dict):
    """A transformers config object from a config.json dict (any quantization_config dropped)."""
    from transformers import AutoConfig

    check_known_architecture(config, "config.json")
    config = copy.deepcopy(config)
    config.pop("quantization_config", None)
    model_type = config.pop("model_type", None)
    try:
        with quiet_transformers():
            return AutoConfig.for_model(model_type, **config)
    except Exception as exc:  # transformers' config validators raise several types (and wrap ValueErrors)
        raise InfoptError(f"config.json: transformers refuses this {model_type!r} config: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """The most specific line of an exception from a third-party validator (its own cause's text when wrapped)."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tail = lines[-1] if lines else exc.__class__.__name__
    return tail.split(": ", 1)[-1][:200] if tail.startswith(("ValueError", "TypeError")) else tail[:200]


def no_init_weights():
    """transformers' context manager that skips random weight initialisation."""
    try:
        from transformers.initialization import no_init_weights as skip
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights as skip
    return skip()


def build_hf_model(config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype, trust_remote_code: bool = False):
    """A transformers causal LM from a config dict and a dense state dict."""
    from transformers import AutoModelForCausalLM

    hf_config = hf_config_from_dict(config)
    with no_init_weights():  # weights come from the checkpoint; only buffers need computing
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that disagree with the config
        raise InfoptError(f"weights do not match the architecture: {str(exc).splitlines()[-1].strip()[:200]}") from None
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise InfoptError(
            f"weights do not match the architecture: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    return model.eval()


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def load_causal_lm(spec: str | ModelDir, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                   trust_remote_code: bool = False):
    """A ready-to-run transformers model from any checkpoint infopt reads."""
    model_dir = spec if isinstance(spec, ModelDir) else open_model(spec, allow_pickle)
    if model_dir.config.get("auto_map"):
        if not trust_remote_code:
            raise InfoptError(f"{model_dir.path} needs custom code from the model repo; pass --trust-remote-code to run it")
        if model_dir.quant_method:
            raise InfoptError("quantized checkpoints of custom-code architectures are not supported yet")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(model_dir.path), dtype=dtype, trust_remote_code=True).eval()
    state = load_state_dict(model_dir)
    return build_hf_model(model_dir.config, state, dtype, trust_remote_code)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InfoptError(f"invalid dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if path.is_file() and is_gguf(path):
        from infopt.formats.gguf_container import read_header
        from infopt.formats.gguf_vocab import tokenizer_from_metadata

        return tokenizer_from_metadata(read_header(path).metadata, path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InfoptError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
