"""The lean sampling loop (fastrl/generation/decode.py) against independent references.

- Its logprobs equal a teacher-forced recomputation: one full forward of prompt + completion without a cache,
  transformers' processors applied position by position, log-softmax, gather. fp32, tolerance 1e-5 (the
  cached and uncached forwards differ only by summation order).
- Its draws follow the processed distribution: 200k draws of one fixed [4, V] score row set against the softmax,
  every frequency within 5 standard errors, filtered tokens (top-k, top-p, min-p) never drawn.
"""
import math

import pytest
import torch

from fastrl.generation.base import SamplingConfig
from fastrl.generation.decode import draw, logits_processors, sample
from fastrl.generation.transformers import TransformersGenerator, left_pad
from helpers_tiny import build_model, build_tokenizer

SETTINGS = [
    SamplingConfig(max_completion_length=12),
    SamplingConfig(max_completion_length=9, temperature=0.7, top_k=7),
    SamplingConfig(max_completion_length=10, temperature=1.3, top_p=0.8, repetition_penalty=1.3),
    SamplingConfig(max_completion_length=8, min_p=0.05),
]


def teacher_forced_logprobs(model, prompt_ids, attention_mask, completion, sampling):
    """[B, T] logprob of each completion token under the processed scores, from one uncached forward."""
    ids = torch.cat([prompt_ids, completion], dim=1)  # [B, P + T]
    mask = torch.cat([attention_mask, torch.ones_like(completion)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()  # [B, P+T, V]
    processors, width = logits_processors(sampling), prompt_ids.shape[1]
    out = []
    for t in range(completion.shape[1]):
        scores = processors(ids[:, :width + t], logits[:, width + t - 1])
        out.append(torch.log_softmax(scores, -1).gather(-1, completion[:, t:t + 1]).squeeze(-1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("sampling", SETTINGS, ids=["plain", "temp-top_k", "temp-top_p-rep", "min_p"])
def test_logprobs_match_teacher_forcing(sampling):
    seed = torch.seed() % 2**31  # a fresh seed, printed on failure
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = build_model(tok, seed=seed % 1000).eval()
    prompts = [tok.encode(p) for p in ["12+3=", "7=", "abc cd=", "99*9=", "x", "hello world="]]  # ragged
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    completion, logps = sample(model, ids, mask, sampling, [tok.eos_token_id], tok.pad_token_id)
    assert completion.shape == logps.shape and completion.shape[1] <= sampling.max_completion_length
    with torch.no_grad():
        expected = teacher_forced_logprobs(model, ids, mask, completion, sampling)
    live = torch.ones_like(completion, dtype=torch.bool)  # tokens up to and including each row's first eos
    for i, row in enumerate(completion.tolist()):
        if tok.eos_token_id in row:
            end = row.index(tok.eos_token_id) + 1
            live[i, end:] = False
            assert all(t == tok.pad_token_id for t in row[end:]), f"seed {seed}: tokens after eos are not padding"
    torch.testing.assert_close(logps[live], expected[live], atol=1e-5, rtol=0, msg=f"seed {seed}")


@pytest.mark.parametrize("sampling", SETTINGS[:1] + [SamplingConfig(top_k=5), SamplingConfig(top_p=0.6),
                                                      SamplingConfig(min_p=0.1)],
                         ids=["plain", "top_k", "top_p", "min_p"])
def test_draws_follow_the_processed_distribution(sampling):
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    vocab, draws = 20, 200_000
    raw = torch.randn(4, vocab, generator=gen) * 1.5
    scores = logits_processors(sampling)(torch.zeros(4, 1, dtype=torch.long), raw.clone())  # [4, V]
    probs = torch.softmax(scores, -1)  # [4, V]
    rows = scores.repeat_interleave(draws // 4, dim=0)  # [draws, V]: block r repeats row r
    tokens, logps = draw(rows, generator=gen)
    freq = torch.stack([torch.bincount(tokens[r * (draws // 4):(r + 1) * (draws // 4)], minlength=vocab)
                        for r in range(4)]).double() / (draws // 4)
    stderr = (probs.double() * (1 - probs.double()) / (draws // 4)).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * stderr + 1e-12).all(), f"seed {seed}"
    assert (freq[probs == 0] == 0).all(), f"seed {seed}: a filtered token was drawn"
    expected_logp = torch.log_softmax(rows, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps, expected_logp, atol=1e-5, rtol=0)
    assert math.isfinite(float(logps.min()))


def test_generator_rollout_cuts_at_eos_with_the_samplers_logprobs():
    """TransformersGenerator.generate: completions end at their first eos (kept) or at max_completion_length
    (truncated), grouped by prompt, each logprob the teacher-forced one (1e-5)."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = build_model(tok, seed=seed % 1000)
    model.train()
    prompts = [tok.encode(p) for p in ["1+2=", "33+4=", "5="]]
    cfg = SamplingConfig(max_completion_length=12, temperature=1.3, top_k=9)
    rollout = TransformersGenerator(model, tok.pad_token_id, [tok.eos_token_id]).generate(prompts, 4, cfg)
    assert model.training, "the generator must restore training mode"
    assert len(rollout.completion_ids) == len(rollout.logprobs) == len(rollout.truncated) == 12
    for i, (ids, lps, cut) in enumerate(zip(rollout.completion_ids, rollout.logprobs, rollout.truncated)):
        assert len(ids) == len(lps) and 1 <= len(ids) <= 12
        assert cut == (tok.eos_token_id not in ids) and tok.eos_token_id not in ids[:-1]
        if cut:
            assert len(ids) == 12
        prompt = torch.tensor([prompts[i // 4]])
        with torch.no_grad():
            expected = teacher_forced_logprobs(model.eval(), prompt, torch.ones_like(prompt), torch.tensor([ids]),
                                               cfg)[0]
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-5, rtol=0, msg=f"seed {seed}, row {i}")


@pytest.mark.parametrize("lead", [(2,), (8,), (3, 1), (4, 16), (256,)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_skinny_linear_equals_f_linear(lead, with_bias):
    """W @ xᵀ on 2..256 rows (fastrl/generation/skinny_linear.py) against F.linear, fp32 rounding apart."""
    from fastrl.generation.skinny_linear import SkinnyLinear
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(*lead, 37, generator=g), torch.randn(61, 37, generator=g), torch.randn(61, generator=g)
    expected = torch.nn.functional.linear(x, w, b if with_bias else None)
    with torch.no_grad(), SkinnyLinear():
        got = torch.nn.functional.linear(x, w, b if with_bias else None)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


def test_skinny_linear_keeps_the_plain_order_where_it_does_not_pay(monkeypatch):
    """One row, more than MAX_ROWS rows, 16-bit inputs and autograd keep F.linear; the sampling loop on a CPU
    takes the W @ xᵀ order for its few-row steps."""
    from fastrl.generation import skinny_linear
    calls = []
    real = skinny_linear._skinny_linear
    monkeypatch.setattr(skinny_linear, "_skinny_linear", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    w = torch.randn(5, 3)
    with torch.no_grad(), skinny_linear.SkinnyLinear():
        for x in (torch.randn(1, 3), torch.randn(257, 3), torch.randn(4, 3).bfloat16()):
            torch.nn.functional.linear(x, w.to(x.dtype))
    with skinny_linear.SkinnyLinear():
        torch.nn.functional.linear(torch.randn(4, 3, requires_grad=True), w)
    assert calls == [None] * 4
    calls.clear()
    tok = build_tokenizer()
    model = build_model(tok, seed=1).eval()
    ids, mask = left_pad([tok.encode("12+3="), tok.encode("7=")], tok.pad_token_id, "cpu")
    sample(model, ids, mask, SamplingConfig(max_completion_length=3), [tok.eos_token_id], tok.pad_token_id)
    assert calls and all(c is not None for c in calls)
