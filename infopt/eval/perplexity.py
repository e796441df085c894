"""Perplexity (the GPTQ/AWQ papers' protocol) and agreement with a baseline model.

The text is tokenized once and cut into non-overlapping windows of `seq_len` tokens; every token
after the first of a window is predicted, and perplexity is exp(mean NLL) over all of them. With a
stride, windows of `seq_len` start every `stride` tokens and each scores only the tokens the
previous window did not (the sliding-window variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from infopt.errors import InfoptError


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    score_from: int  # first target position; targets are ids[score_from:end]


def plan_windows(total: int, seq_len: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    if seq_len < 2:
        raise InfoptError(f"sequence length must be at least 2, got {seq_len}")
    if total < seq_len:
        raise InfoptError(f"dataset has {total} tokens; one window of {seq_len} needs at least {seq_len}")
    if stride is None or stride >= seq_len:
        step = stride or seq_len
        windows = [Window(b, b + seq_len, b + 1) for b in range(0, total - seq_len + 1, step)]
    else:
        if stride < 1:
            raise InfoptError(f"stride must be positive, got {stride}")
        windows, prev_end = [], 0
        for begin in range(0, total, stride):
            end = min(begin + seq_len, total)
            windows.append(Window(begin, end, max(prev_end, begin + 1)))
            prev_end = end
            if end == total:
                break
    if max_windows is not None:
        if max_windows < 1:
            raise InfoptError(f"--max-windows must be positive, got {max_windows}")
        windows = windows[:max_windows]
    return windows


@dataclass
class _Totals:
    nll: float = 0.0
    tokens: int = 0
    kl: float = 0.0
    agree: int = 0
    base_nll: float = 0.0


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0].end - last[0].begin, last[0].end - last[0].score_from) == (w.end - w.begin, w.end - w.score_from):
            last.append(w)
        else:
            batches.append([w])
    return batches


@torch.no_grad()
def _log_probs(model, inputs: torch.Tensor, keep: int) -> torch.Tensor:
    """Log-probabilities (fp32) of the last `keep` next-token predictions that have a target."""
    logits = model(inputs).logits[:, -keep - 1 : -1, :]
    return torch.log_softmax(logits.float(), dim=-1)


def _baseline_log_probs(baseline, inputs: torch.Tensor, keep: int, batch: list[Window], cache: dict | None):
    """The baseline's log-probabilities for a batch, from `cache` when an earlier comparison computed them. The cache
    holds {"budget": {"left": bytes}} shared by all caches of a session; past the budget batches are recomputed."""
    if cache is None:
        return _log_probs(baseline, inputs, keep)
    key = tuple((w.begin, w.end, w.score_from) for w in batch)
    if key in cache:
        return cache[key]
    log_p = _log_probs(baseline, inputs, keep)
    size = log_p.numel() * log_p.element_size()
    if size <= cache["budget"]["left"]:
        cache["budget"]["left"] -= size
        cache[key] = log_p
    return log_p


def evaluate(model, ids: torch.Tensor, seq_len: int, stride: int | None = None, max_windows: int | None = None,
             baseline=None, batch_size: int = 1, progress: Callable[[int, int], None] | None = None,
             baseline_cache: dict | None = None) -> dict:
    """Perplexity of `model` on `ids`; with `baseline`, also KL(baseline || model) and top-1 agreement.
    `baseline_cache` keeps the baseline's log-probabilities for later calls on the same windows."""
    windows = plan_windows(ids.numel(), seq_len, stride, max_windows)
    totals, done = _Totals(), 0
    for batch in _batches(windows, max(1, batch_size)):
        inputs = torch.stack([ids[w.begin : w.end] for w in batch])
        keep = batch[0].end - batch[0].score_from
        targets = torch.stack([ids[w.score_from : w.end] for w in batch])
        log_p = _log_probs(model, inputs, keep)
        totals.nll -= log_p.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64).item()
        totals.tokens += targets.numel()
        if baseline is not None:
            base = _baseline_log_probs(baseline, inputs, keep, batch, baseline_cache)
            totals.base_nll -= base.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64).item()
            totals.kl += (base.exp() * (base - log_p)).sum(dtype=torch.float64).item()
            totals.agree += (base.argmax(-1) == log_p.argmax(-1)).sum().item()
        done += len(batch)
        if progress:
            progress(done, len(windows))
    result = {
        "ppl": math.exp(totals.nll / totals.tokens),
        "nll_mean": totals.nll / totals.tokens,
        "tokens": totals.tokens,
        "windows": len(windows),
        "seq_len": seq_len,
        "stride": stride,
    }
    if baseline is not None:
        base_ppl = math.exp(totals.base_nll / totals.tokens)
        result.update({
            "baseline_ppl": base_ppl,
            "ppl_delta_rel": result["ppl"] / base_ppl - 1.0,
            "kl_mean": totals.kl / totals.tokens,
            "top1_agreement": totals.agree / totals.tokens,
        })
    return result


def default_seq_len(config: dict) -> int:
    text = config.get("text_config", config)
    limit = text.get("max_position_embeddings") or text.get("n_positions") or 2048
    return min(2048, int(limit))


def default_batch_size(seq_len: int, vocab_size: int, budget_bytes: int = 256 * 2**20) -> int:
    """Windows per forward so the fp32 logits (and their log-softmax) stay within a budget."""
    per_window = seq_len * vocab_size * 4 * 3
    return max(1, min(64, budget_bytes // max(1, per_window)))


def window_inputs(ids: torch.Tensor, windows: list[Window]) -> list[list[int]]:
    return [ids[w.begin : w.end].tolist() for w in windows]


def evaluate_targets(windows: list[Window], scores: list[tuple[list[float], list[int]]],
                     base_scores: list[tuple[list[float], list[int]]] | None = None, seq_len: int | None = None,
                     stride: int | None = None) -> dict:
    """The same protocol as `evaluate` from an engine that returns, per window, only the log-probability of each
    token after the first and the token it ranked first (vLLM's prompt logprobs). Without full distributions there
    is no KL: the report says so (`kl_mean` None)."""
    totals = _Totals()
    for i, window in enumerate(windows):
        first = window.score_from - window.begin - 1  # index of the first scored target in a window's list
        log_p, top = scores[i]
        totals.nll -= math.fsum(log_p[first:])
        totals.tokens += len(log_p) - first
        if base_scores is not None:
            base_log_p, base_top = base_scores[i]
            totals.base_nll -= math.fsum(base_log_p[first:])
            totals.agree += sum(a == b for a, b in zip(top[first:], base_top[first:]))
    result = {"ppl": math.exp(totals.nll / totals.tokens), "nll_mean": totals.nll / totals.tokens,
              "tokens": totals.tokens, "windows": len(windows), "seq_len": seq_len, "stride": stride}
    if base_scores is not None:
        base_ppl = math.exp(totals.base_nll / totals.tokens)
        result.update({"baseline_ppl": base_ppl, "ppl_delta_rel": result["ppl"] / base_ppl - 1.0, "kl_mean": None,
                       "top1_agreement": totals.agree / totals.tokens})
    return result
