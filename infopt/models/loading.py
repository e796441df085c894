"""Find a model (local folder or hub id), check its files, and load it for evaluation or generation."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from infopt.errors import InfoptError
from infopt.formats import registry
from infopt.formats.safetensors_io import check_safetensors, weight_files

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
    if not path.is_dir():
        raise InfoptError(f"{path} is not a model directory (expected a folder with config.json)")
    if not (path / "config.json").is_file():
        raise InfoptError(f"{path} is not a model directory: no config.json")
    config = read_config(path / "config.json")
    files = weight_files(path)
    if files:
        for file in files:
            check_safetensors(file)
        return ModelDir(path, config, files)
    pickles = sorted({p for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles and not allow_pickle:
        raise InfoptError(
            f"{path} holds only pickle weights ({pickles[0].name}), which can run code when loaded; "
            "pass --allow-pickle to load them anyway"
        )
    if not pickles:
        raise InfoptError(f"{path} is not a model directory: no *.safetensors weights")
    return ModelDir(path, config, pickles, pickle=True)


def load_config_only(spec: str) -> dict:
    """config.json of a folder, a config file, or a hub id, without touching weights."""
    path = locate(spec, config_only=True)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InfoptError(f"no config.json at {spec}")
    return read_config(path)


def load_state_dict(model: ModelDir) -> dict[str, torch.Tensor]:
    """All weights as plain tensors (quantized formats dequantized by their reader)."""
    if model.pickle:
        state: dict[str, torch.Tensor] = {}
        for file in model.files:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        return state
    if model.quant_method is None:
        from infopt.formats.safetensors_io import load_tensors

        return load_tensors(model.files)
    return registry.read_dense_state_dict(model.files, model.config)


def hf_config_from_dict(config: dict):
    """A transformers config object from a config.json dict (any quantization_config dropped)."""
    from transformers import AutoConfig

    config = copy.deepcopy(config)
    config.pop("quantization_config", None)
    model_type = config.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as exc:
        raise InfoptError(f"transformers cannot build model type {model_type!r}: {exc}") from None


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
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
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

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InfoptError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
