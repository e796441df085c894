"""Speculative decoding: greedy output identical to plain decoding, sampled tokens distributed as the target's."""

import json

import pytest
import torch

from infopt.models.loading import open_model
from infopt.runtime.engine import Engine, SamplingParams, Sequence
from infopt.runtime.kv_cache import KVCache
from infopt.runtime.model import load_engine_model
from infopt.runtime.runner import draft_backend
from infopt.runtime.speculative import ModelDrafter, NgramDrafter, SpeculativeEngine, draft_cache_for, self_draft, verify
from tests.conftest import run_cli
from tests.tiny_models import make_tiny_model

# chi-square critical values at significance 0.001 (standard tables) by degrees of freedom
CHI2_CRITICAL_0001 = {5: 20.515, 7: 24.322}


def _cache(model, blocks=256, block_size=8) -> KVCache:
    return KVCache.for_model(model, blocks, block_size)


@pytest.fixture(scope="module")
def target(stories_hf):
    return load_engine_model(open_model(str(stories_hf)))


@pytest.fixture(scope="module")
def drafts(stories_hf, tmp_path_factory, target):
    far = make_tiny_model("llama", tmp_path_factory.mktemp("far") / "m", vocab_size=512, seed=3)
    return {"self:int8": lambda: self_draft(open_model(str(stories_hf)), "int8", torch.float32),
            "self:int4": lambda: self_draft(open_model(str(stories_hf)), "int4", torch.float32),
            "self:int4-a8": lambda: self_draft(open_model(str(stories_hf)), "int4", torch.float32, draft_backend(None)),
            "far": lambda: load_engine_model(open_model(str(far))),
            "same": lambda: target}


def _drafter(drafts, name, engine_cache, k):
    if name == "ngram":
        return NgramDrafter()
    model = drafts[name]()
    return ModelDrafter(model, draft_cache_for(model, engine_cache, 16, k))


PROMPTS = [[1], [1, 450, 312, 271], [1] + list(range(300, 330)), [1, 42, 43, 42, 43, 42], [1, 9, 8, 7]]


def _plain(target, prompts, params):
    engine = Engine(target, _cache(target))
    for p in prompts:
        engine.submit(p, params)
    return [s.tokens for s in engine.run()]


def _assert_no_leaks(cache: KVCache) -> None:
    assert cache.allocator.num_free == cache.allocator.num_blocks and set(cache.allocator.refcount) == {0}


@pytest.mark.parametrize("draft", ["ngram", "self:int8", "self:int4", "self:int4-a8", "far"])
@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_greedy_output_is_identical_with_and_without_drafting(target, drafts, draft, k):
    params = SamplingParams(max_new_tokens=40)
    want = _plain(target, PROMPTS, params)
    cache = _cache(target)
    drafter = _drafter(drafts, draft, cache, k)
    engine = SpeculativeEngine(target, cache, drafter, num_draft=k, adaptive=k == 4)
    for p in PROMPTS:
        engine.submit(p, params)
    assert [s.tokens for s in engine.run()] == want
    _assert_no_leaks(cache)
    if isinstance(drafter, ModelDrafter):
        _assert_no_leaks(drafter.cache)
        assert not drafter.tables
    assert engine.spec.rounds < 5 * 40 or draft in ("far", "ngram")  # drafting saved target forwards
    if draft == "self:int8":
        assert engine.spec.accepted / engine.spec.proposed > 0.7


def test_drafts_default_to_int8_activations_where_the_cpu_has_them(drafts):
    from infopt.runtime import kernels
    from infopt.runtime.qlinear import QuantLinear

    assert draft_backend("ext") == "ext" and draft_backend("torch") == "torch"  # an explicit --kernels is kept
    assert draft_backend(None) == ("ext-a8" if kernels.has_vnni() else None)
    if kernels.has_vnni():
        linears = [m for m in drafts["self:int4-a8"]().modules() if isinstance(m, QuantLinear)]
        assert linears and {m.backend for m in linears} == {"ext-a8"}


def test_greedy_speculation_survives_preemption(target, drafts):
    params = SamplingParams(max_new_tokens=60)
    want = _plain(target, PROMPTS, params)
    cache = _cache(target, blocks=24)  # 192 slots for five sequences of up to 91 tokens
    drafter = _drafter(drafts, "self:int8", cache, 4)
    engine = SpeculativeEngine(target, cache, drafter, num_draft=4)
    for p in PROMPTS:
        engine.submit(p, params)
    assert [s.tokens for s in engine.run()] == want
    assert engine.timings.preemptions > 0
    _assert_no_leaks(cache)
    _assert_no_leaks(drafter.cache)


def test_a_draft_equal_to_the_target_is_always_accepted_when_sampling(target, drafts):
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.95, seed=4)
    cache = _cache(target)
    engine = SpeculativeEngine(target, cache, _drafter(drafts, "same", cache, 4), num_draft=4)
    for p in PROMPTS:
        engine.submit(p, params)
    engine.run()
    assert engine.spec.proposed > 0 and engine.spec.accepted == engine.spec.proposed


def _fake_sequence(seed: int) -> Sequence:
    return Sequence(0, 0, 0, 1, [1], SamplingParams(temperature=1.0), torch.Generator().manual_seed(seed))


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft_kind", ["far", "deterministic"])
def test_sampled_tokens_follow_the_target_distribution(draft_kind):
    """Chi-square at significance 0.001: the first emitted token ~ p0 and, when the first draft token was kept,
    the second ~ p1, with a draft distribution far from the target's."""
    vocab, trials = 6, 20000
    p = torch.tensor([[0.05, 0.40, 0.05, 0.30, 0.15, 0.05], [0.30, 0.05, 0.25, 0.10, 0.05, 0.25],
                      [0.10, 0.10, 0.20, 0.20, 0.20, 0.20]])
    q = torch.tensor([[0.50, 0.02, 0.30, 0.02, 0.06, 0.10], [0.02, 0.60, 0.03, 0.30, 0.03, 0.02]])
    seq = _fake_sequence(0)
    draw = torch.Generator().manual_seed(1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        if draft_kind == "far":
            draft = [int(torch.multinomial(q[i], 1, generator=draw)) for i in range(2)]
            probs = [q[0], q[1]]
        else:  # a fixed proposal (n-gram lookup): q is one-hot
            draft, probs = [3, 0], [None, None]
        kept, tokens = verify(p.log(), draft, probs, seq)
        first[tokens[0]] += 1
        if kept >= 1:
            second[tokens[1]] += 1
    assert _chi_square(first, p[0]) < CHI2_CRITICAL_0001[vocab - 1]
    assert second.sum() > 1000 and _chi_square(second, p[1]) < CHI2_CRITICAL_0001[vocab - 1]


def test_verify_detects_a_wrong_acceptance_rule():
    """The chi-square check has power: always accepting the draft is caught."""
    vocab, trials = 6, 20000
    q = torch.tensor([0.50, 0.02, 0.30, 0.02, 0.06, 0.10])
    p = torch.tensor([0.05, 0.40, 0.05, 0.30, 0.15, 0.05])
    draw = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab)
    for _ in range(trials):
        counts[int(torch.multinomial(q, 1, generator=draw))] += 1  # what "accept everything" would emit
    assert _chi_square(counts, p) > CHI2_CRITICAL_0001[vocab - 1]


def test_ngram_lookup_copies_what_followed_the_latest_match():
    drafter = NgramDrafter(max_n=3)
    assert drafter._lookup([5, 6, 7, 8, 9, 5, 6, 7], 3) == ([8, 9, 5], [None] * 3)
    assert drafter._lookup([1, 2, 3, 4], 3) == ([], [])
    assert drafter._lookup([4, 1, 2, 4], 2) == ([1, 2], [None, None])


def _word_level_tokenizer(model):
    """Give a model a 512-word tokenizer unlike stories260K's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(model)
    return model


def test_run_with_drafts_from_the_command_line(stories_hf, tmp_path):
    result = run_cli("run", str(stories_hf), "--max-new-tokens", "40", "--draft", "self:int8", "--num-draft", "3",
                     "--json")
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)["speculative"]
    assert spec["same_tokens_as_plain"] and spec["acceptance_rate"] > 0.5 and spec["tokens_per_target_forward"] > 1
    assert spec["decode_speedup"] > 0
    assert spec["draft_quantized_linears"] == {"ext": 5 * 4}  # 5 layers of int8: exact kernel, fused qkv, gate_up
    a8 = run_cli("run", str(stories_hf), "--max-new-tokens", "20", "--draft", "self:int4", "--json")
    assert a8.returncode == 0, a8.stderr
    spec = json.loads(a8.stdout)["speculative"]
    assert spec["same_tokens_as_plain"]
    assert spec["draft_quantized_linears"] == {draft_backend(None) or "ext": 5 * 4}
    other = _word_level_tokenizer(make_tiny_model("llama", tmp_path / "other", vocab_size=512))
    refused = run_cli("run", str(stories_hf), "--draft", str(other), "--max-new-tokens", "5")
    assert refused.returncode == 2 and "different tokenizers" in refused.stderr, refused.stderr
    bad = run_cli("run", str(stories_hf), "--draft", "self:int3", "--max-new-tokens", "5")
    assert bad.returncode == 2 and "invalid self draft" in bad.stderr
