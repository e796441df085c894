"""Train the benchmark model: a small Llama trained from scratch on real text, cached outside the repo.

Every linear layer has shapes that are multiples of 128, so GPTQ/AWQ packing and group size 128
apply to all of them. The model uses stories260K's 512-token tokenizer, so stories260K can act as
its draft model. A fixed seed and step count give the same weights on every run with the same
thread count.

    python benchmarks/train_bench_model.py [--threads 2] [--steps N] [--out DIR] [--force]

The output folder is $INFOPT_BENCH_CACHE (default ~/.cache/infopt/bench) / llama-<shape>-<hash>.
If that folder is already complete, the script only prints its path. The path is always the last
line on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from infopt.calibration.sources import load_text, wikitext_rows  # noqa: E402
from infopt.calibration.windows import tokenize  # noqa: E402
from infopt.errors import InfoptError  # noqa: E402
from infopt.paths import atomic_output_dir, require_data_file, sha256_file  # noqa: E402

CACHE_ENV = "INFOPT_BENCH_CACHE"
TOKENIZER_FILE = "tinyllamas-stories260K/tok512.model"
TRAIN_FILES = ("wikitext-2-tokens/valid.txt", "tinystories/tinystories_val.txt")
EVAL_DATASETS = ("wikitext2", "tinystories")
RECIPE = 1  # bump when the training code changes in a way BenchConfig does not show
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json")


@dataclass(frozen=True)
class BenchConfig:
    hidden: int = 256
    intermediate: int = 768
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    max_positions: int = 1024
    rope_theta: float = 10000.0
    seq_len: int = 1024  # = max_positions: infopt evaluates at max_position_embeddings
    batch: int = 8
    steps: int = 800
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True  # autocast for matmuls; weights and optimizer state stay fp32
    seed: int = 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def config_hash(cfg: BenchConfig) -> str:
    files = {rel: sha256_file(require_data_file(rel)) for rel in (TOKENIZER_FILE, *TRAIN_FILES)}
    payload = json.dumps({"recipe": RECIPE, "config": asdict(cfg), "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "infopt" / "bench").expanduser()


def default_out(cfg: BenchConfig) -> Path:
    return cache_dir() / f"llama-{cfg.layers}x{cfg.hidden}-{config_hash(cfg)}"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def llama_config(cfg: BenchConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads, max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def build_model(cfg: BenchConfig):
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(llama_config(cfg))


def training_text(relative: str) -> str:
    raw = require_data_file(relative).read_text(encoding="utf-8")
    if not relative.startswith("wikitext"):
        return raw
    # Lay the rows out like the wikitext2 evaluation text, and undo the tokenized split's " @-@ " splits.
    for marker, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        raw = raw.replace(marker, plain)
    return "\n\n".join(wikitext_rows(raw))


def token_stream(tokenizer) -> tuple[torch.Tensor, dict[str, int]]:
    """All training files as one id sequence, each file starting with BOS."""
    parts = [tokenize(tokenizer, training_text(rel)) for rel in TRAIN_FILES]
    return torch.cat(parts), {rel: part.numel() for rel, part in zip(TRAIN_FILES, parts)}


def sample_batch(stream: torch.Tensor, cfg: BenchConfig, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - cfg.seq_len + 1, (cfg.batch,), generator=gen)
    return torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])


def lr_at(step: int, cfg: BenchConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model, stream: torch.Tensor, cfg: BenchConfig) -> list[float]:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = sample_batch(stream, cfg, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{cfg.steps}  loss {losses[-1]:.4f}  lr {lr_at(step, cfg):.2e}  {elapsed:.0f}s")
    model.eval()
    return losses


def unigram_ppl(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one unigram model fitted on the training ids: the floor a bench model must beat."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    log_p = (counts / counts.sum()).log()
    return math.exp(-log_p[test_ids].mean().item())


def evaluate(folder: Path, max_windows: int) -> dict[str, dict]:
    from infopt.workflows import evaluate_checkpoint

    keep = ("ppl", "nll_mean", "tokens", "windows", "seq_len")
    results = {}
    for name in EVAL_DATASETS:
        report = evaluate_checkpoint(str(folder), name, max_windows=max_windows)
        results[name] = {key: report[key] for key in keep}
    return results


def train_into(folder: Path, cfg: BenchConfig, threads: int, max_windows: int) -> None:
    """Tokenizer, weights and training.json for `cfg`, written into the (empty) `folder`."""
    import transformers

    from infopt.models.llama2c import write_tokenizer

    begin = time.perf_counter()
    write_tokenizer(require_data_file(TOKENIZER_FILE), folder, cfg.max_positions)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    stream, counts = token_stream(tokenizer)
    log(f"training {cfg.steps} steps x {cfg.batch} x {cfg.seq_len} tokens on {threads} threads "
        f"({stream.numel()} tokens of text)")
    model = build_model(cfg)
    losses = train(model, stream, cfg)
    seconds = time.perf_counter() - begin
    model.save_pretrained(str(folder))
    evals = evaluate(folder, max_windows)
    scored = evals["wikitext2"]["windows"] * cfg.seq_len
    wiki_ids = tokenize(tokenizer, load_text("wikitext2")[: 4 * scored])[:scored]  # < 4 chars per token
    record = {
        "config": asdict(cfg),
        "recipe": RECIPE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch * cfg.seq_len,
        "tokenizer": TOKENIZER_FILE,
        "data": {rel: {"tokens": n, "sha256": sha256_file(require_data_file(rel))} for rel, n in counts.items()},
        "threads": threads,
        "seconds": round(seconds, 1),
        "total_seconds": round(time.perf_counter() - begin, 1),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "last_step_loss": losses[-1],
        "loss_every_25_steps": [round(loss, 4) for loss in losses[::25]],
        "eval": evals,
        "wikitext2_unigram_ppl": unigram_ppl(stream, wiki_ids[1:], cfg.vocab),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def build(cfg: BenchConfig, out: Path, threads: int = 2, force: bool = False, max_windows: int = 40) -> Path:
    """Train into `out` (via a temporary folder) unless a complete model is already there."""
    if is_complete(out) and not force:
        return out
    if out.exists() and not force:
        raise InfoptError(f"{out} exists but is not a complete bench model (use --force to replace it)")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with atomic_output_dir(out, force=True) as tmp:
            train_into(tmp, cfg, threads, max_windows)
    finally:
        torch.set_num_threads(previous_threads)
    return out


def ensure_bench_model(threads: int = 2) -> Path:
    """The default bench model's folder, trained first if the cache does not hold it yet."""
    cfg = BenchConfig()
    return build(cfg, default_out(cfg), threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    parser.add_argument("--steps", type=int, help=f"training steps (default {BenchConfig.steps})")
    parser.add_argument("--out", type=Path, help="output folder (default: a hashed folder in the cache)")
    parser.add_argument("--force", action="store_true", help="retrain even if the output folder is complete")
    args = parser.parse_args(argv)
    cfg = BenchConfig() if args.steps is None else replace(BenchConfig(), steps=args.steps)
    out = args.out or default_out(cfg)
    try:
        path = build(cfg, out, args.threads, args.force)
    except InfoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    training = json.loads((path / "training.json").read_text())
    log(f"wikitext2 ppl {training['eval']['wikitext2']['ppl']:.2f}  tinystories ppl "
        f"{training['eval']['tinystories']['ppl']:.2f}  train loss {training['final_train_loss']:.4f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
