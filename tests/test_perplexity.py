"""infopt's perplexity against an independent computation, and the window protocol."""

import math

import pytest
import torch

from infopt.calibration.sources import load_text
from infopt.calibration.windows import tokenize
from infopt.errors import InfoptError
from infopt.eval.perplexity import evaluate, plan_windows
from infopt.models.loading import load_causal_lm, load_tokenizer
from infopt.workflows import evaluate_checkpoint


def _independent_ppl(model, ids, seq_len, max_windows):
    """A plain loop over transformers logits: windows of seq_len, every next token scored."""
    nll, count = 0.0, 0
    n = min(ids.numel() // seq_len, max_windows)
    with torch.no_grad():
        for i in range(n):
            window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0)
            logits = model(window).logits[0, :-1].double()
            targets = window[0, 1:]
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    return math.exp(nll / count), count


def test_eval_matches_an_independent_loop(stories_hf):
    result = evaluate_checkpoint(str(stories_hf), "tinystories", seq_len=256, max_windows=40)
    model = load_causal_lm(str(stories_hf))
    ids = tokenize(load_tokenizer(stories_hf), load_text("tinystories"))
    expected, count = _independent_ppl(model, ids, 256, 40)
    assert result["tokens"] == count and result["windows"] == 40 and result["seq_len"] == 256
    assert abs(result["ppl"] / expected - 1) < 1e-4


def test_sliding_window_scores_every_token_once_with_more_context(stories_hf):
    model = load_causal_lm(str(stories_hf))
    ids = tokenize(load_tokenizer(stories_hf), load_text("tinystories"))[:3000]
    plain = evaluate(model, ids, 256)
    sliding = evaluate(model, ids, 256, stride=128)
    assert sliding["tokens"] == ids.numel() - 1  # every token after the first, exactly once
    assert sliding["ppl"] < plain["ppl"]  # more context per scored token


def test_self_baseline_gives_zero_kl_and_full_agreement(stories_hf):
    model = load_causal_lm(str(stories_hf))
    ids = tokenize(load_tokenizer(stories_hf), load_text("tinystories"))[:2048]
    r = evaluate(model, ids, 512, baseline=model, batch_size=2)
    assert r["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1_agreement"] == 1.0 and r["ppl_delta_rel"] == pytest.approx(0.0, abs=1e-9)


def test_window_plans():
    assert [(w.begin, w.end, w.score_from) for w in plan_windows(10, 4)] == [(0, 4, 1), (4, 8, 5)]
    slide = plan_windows(10, 4, stride=2)
    assert [(w.begin, w.end, w.score_from) for w in slide] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert len(plan_windows(100, 10, max_windows=3)) == 3
    with pytest.raises(InfoptError, match="needs at least"):
        plan_windows(5, 10)


def test_bfloat16_evaluation_is_close_to_float32(stories_hf):
    fp32 = evaluate_checkpoint(str(stories_hf), "tinystories", seq_len=512, max_windows=20)
    bf16 = evaluate_checkpoint(str(stories_hf), "tinystories", seq_len=512, max_windows=20, dtype=torch.bfloat16)
    assert bf16["ppl"] != fp32["ppl"]
    assert abs(bf16["ppl"] / fp32["ppl"] - 1) < 0.02
