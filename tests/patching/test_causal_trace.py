"""Causal tracing (ROME) against a plain hand-written loop: one ``run_with_hooks`` forward per
noise draw and cell, with the noise, the restoration and the severing written out here; the
ends of the normalisation (the clean state restored = 1, nothing restored = 0); the spread
over noise draws and the seed; windows, severing and ``mode="noise"``; the Hugging Face
architectures; files, frames and bad input.

The models are tiny and random with their weights redrawn at unit scale, so the corruption
moves p(target) by a visible amount (at init scale the clean and corrupted runs nearly agree
and a wrong restoration could pass).
"""

from __future__ import annotations

import math

import pytest
import torch

import poisonmech as pm
from poisonmech.config import ConfigError
from poisonmech.patching import CausalTraceConfig, PatchResult, causal_trace
from poisonmech.tasks.tokenizer import build_word_tokenizer
from tests.helpers import small_model
from tests.hf_models import HF_ARCHS, hf_module

VOCAB, T, L = 50, 6, 3
SPANS = [(1, 3), (2, 4)]  # the subject's tokens per prompt, end exclusive
TOL = 1e-6


def sharpen(model, seed: int = 0):
    """Every weight redrawn at unit scale (norm gains near 1), in place."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.endswith("weight"):  # the 1-d weights are the norms' gains
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model():
    return sharpen(small_model(vocab=VOCAB, n_layers=L))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------- the hand-written reference
def rome_layers(layer: int, n_layers: int, window: int) -> list[int]:
    """ROME's ``trace_important_window``: ``range(max(0, layer - window // 2), min(n, layer - (-window // 2)))``."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def hand_noise(model, spans, samples, noise, seed):
    """The documented draw: one generator, prompt by prompt, ``noise * W_E.std() * randn(samples, span, d)``."""
    scale = noise * float(model.W_E.detach().float().std())
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(samples, e - s, model.cfg.d_model, generator=g) for s, e in spans]


def hand_p(model, toks, hooks, target):
    """p(target) at the last position of one prompt, from the full logits."""
    with torch.no_grad():
        logits = model.run_with_hooks(toks[None], fwd_hooks=hooks)
    return float(logits[0, -1].softmax(-1)[target])


def record(store, key):
    def hook(act, hook):
        store[key] = act.detach().clone()
        return act
    return hook


class HandTrace:
    """The plain loop: every run is one prompt's ``run_with_hooks`` forward per noise draw, the
    noise and the restorations written out as hooks here. The clean and corrupted runs of each
    (prompt, draw) are recorded once; :meth:`cell` runs one forward per prompt and draw."""

    SITES = ("resid_post", "mlp_out", "attn_out")

    def __init__(self, model, tokens, spans, target, samples=3, noise=3.0, seed=0):
        self.model, self.tokens, self.spans, self.target, self.samples = model, tokens, spans, target, samples
        self.draws = hand_noise(model, spans, samples, noise, seed)
        n_layers = model.cfg.n_layers
        names = [(x, k) for x in self.SITES for k in range(n_layers)]
        self.clean, self.corrupt = [], {}
        self.p_clean, self.p_corr = torch.zeros(len(spans)), torch.zeros(len(spans), samples)
        for b in range(len(spans)):
            acts: dict = {}
            self.p_clean[b] = self.p(b, [(f"blocks.{k}.hook_{x}", record(acts, (x, k))) for x, k in names])
            self.clean.append(acts)
            for s in range(samples):
                acts = {}
                self.p_corr[b, s] = self.p(b, [("hook_embed", self.add_noise(b, s))] +
                                           [(f"blocks.{k}.hook_{x}", record(acts, (x, k))) for x, k in names])
                self.corrupt[b, s] = acts

    def add_noise(self, b, s):
        start, end = self.spans[b]

        def hook(act, hook):
            act = act.clone()
            act[:, start:end] += self.draws[b][s]
            return act
        return hook

    def p(self, b, hooks):
        return hand_p(self.model, self.tokens[b], hooks, int(self.target[b]))

    def cell(self, layers, pos, *, site="resid_post", sever=None, mode="denoise"):
        """p(target) ``[batch sample]`` with ``site`` at ``layers`` and ``pos`` restored (denoise:
        the corrupted run, clean values; noise: the clean run, corrupted values). Severing
        freezes ``sever``'s output at ``pos`` in every layer at the base run's own value."""
        def put(value):
            def hook(act, hook):
                act = act.clone()
                act[0, pos] = value[0, pos]
                return act
            return hook

        out = torch.zeros(len(self.spans), self.samples)
        for b in range(len(self.spans)):
            for s in range(self.samples):
                src, base = (self.clean[b], self.corrupt[b, s]) if mode == "denoise" else \
                    (self.corrupt[b, s], self.clean[b])
                hooks = [("hook_embed", self.add_noise(b, s))] if mode == "denoise" else []
                hooks += [(f"blocks.{k}.hook_{site}", put(src[(site, k)])) for k in layers]
                if sever:
                    hooks += [(f"blocks.{k}.hook_{sever}_out", put(base[(f"{sever}_out", k)]))
                              for k in range(self.model.cfg.n_layers)]
                out[b, s] = self.p(b, hooks)
        return out

    @property
    def base(self):
        return self.p_corr


def clean_top(model, tokens):
    with torch.no_grad():
        return model(tokens)[:, -1].argmax(-1)


@pytest.fixture(scope="module")
def target(model, tokens):
    return clean_top(model, tokens)


@pytest.fixture(scope="module")
def hand(model, tokens, target):
    return HandTrace(model, tokens, SPANS, target, samples=3)


@pytest.fixture(scope="module")
def trace(model, tokens):
    """The default trace (resid_post, the clean top prediction as target), 3 draws, small batches."""
    return causal_trace(model, tokens, SPANS, samples=3, batch_size=7, progress=False)


# ---------------------------------------------------------------------- the ends of the scale
def test_clean_state_restored_is_one_and_nothing_restored_is_zero(model, tokens, target, hand, trace):
    r = trace
    with torch.no_grad():
        p_clean = model(tokens)[:, -1].softmax(-1)[torch.arange(2), target]
    torch.testing.assert_close(r.reference, p_clean, atol=TOL, rtol=0)
    assert (r.reference - r.baseline).abs().min() > 0.05  # the corruption moves p(target)
    # the last layer's last hidden state is the clean run's: exactly the clean p, normalised 1
    torch.testing.assert_close(r.sample_values[L - 1, T - 1], p_clean[:, None].expand(2, 3), atol=TOL, rtol=0)
    torch.testing.assert_close(r.normalized[L - 1, T - 1], torch.ones(2), atol=1e-5, rtol=0)
    # before the subject, and at the last layer away from the last position: still corrupted, 0
    for b, (start, _) in enumerate(SPANS):
        assert torch.all(r.normalized[:, :start, b] == 0)
        assert torch.all(r.spread[:, :start, b] == 0)
    assert torch.all(r.normalized[L - 1, : T - 1] == 0)
    # ... and those cells, which the analysis fills without a forward, are what a forward gives
    for layer, pos, rows in ((0, 0, [0, 1]), (1, 1, [1]), (L - 1, 2, [0, 1])):  # prompt 1's subject starts at 2
        got = hand.cell([layer], pos)
        torch.testing.assert_close(got[rows], hand.base[rows], atol=TOL, rtol=0)
        torch.testing.assert_close(r.sample_values[layer, pos, rows], hand.base[rows], atol=TOL, rtol=0)
    assert (hand.cell([1], 1)[0] - hand.base[0]).abs().max() > 1e-3  # prompt 0's subject starts at 1
    # the reference's own check: with the noise in, the clean state at every position restores p exactly
    torch.testing.assert_close(hand.cell([0], slice(None)), p_clean[:, None].expand(2, 3), atol=TOL, rtol=0)


def test_every_cell_equals_the_hand_loop(model, tokens, hand, trace):
    r = trace
    for layer in range(L):
        for pos in range(T):
            torch.testing.assert_close(r.sample_values[layer, pos], hand.cell([layer], pos), atol=TOL, rtol=0)
    torch.testing.assert_close(r.sample_baseline, hand.base, atol=TOL, rtol=0)
    torch.testing.assert_close(r.baseline, hand.base.mean(-1), atol=TOL, rtol=0)
    torch.testing.assert_close(r.reference, hand.p_clean, atol=TOL, rtol=0)
    torch.testing.assert_close(r.values, r.sample_values.mean(-1))
    # the batch size is only a memory budget
    big = causal_trace(model, tokens, SPANS, samples=3, progress=False, batch_size=1000)
    torch.testing.assert_close(big.sample_values, r.sample_values, atol=TOL, rtol=0)
    # the normalised effect per draw averages to the normalised mean effect (ROME averages p)
    torch.testing.assert_close(r.sample_normalized.mean(-1), r.normalized, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", ["mlp_out", "attn_out"])
def test_windowed_restoration_equals_the_hand_loop(model, tokens, target, hand, site):
    r = causal_trace(model, tokens, SPANS, target, site=site, window=3, samples=3, progress=False)
    assert r.method == "causal-trace(window=3)" and r.axes == ("layer", "pos")
    assert [rome_layers(layer, L, 3) for layer in range(L)] == [[0, 1], [0, 1, 2], [1, 2]]
    for layer, pos in ((0, 2), (1, 2), (2, 3), (1, T - 1)):
        torch.testing.assert_close(r.sample_values[layer, pos], hand.cell(rome_layers(layer, L, 3), pos, site=site),
                                   atol=TOL, rtol=0)
    # a window of one layer is the single layer's restoration
    one = causal_trace(model, tokens, SPANS, target, site=site, window=1, samples=3, progress=False)
    torch.testing.assert_close(one.sample_values[1, 2], hand.cell([1], 2, site=site), atol=TOL, rtol=0)


def test_severed_variant_equals_the_hand_loop_and_differs(model, tokens, target, hand, trace):
    plain = trace
    cut = causal_trace(model, tokens, SPANS, target, sever="mlp", samples=3, progress=False)
    assert cut.method == "causal-trace(sever=mlp)"
    for layer, pos in ((0, 2), (1, 3), (0, T - 1)):
        torch.testing.assert_close(cut.sample_values[layer, pos], hand.cell([layer], pos, sever="mlp"),
                                   atol=TOL, rtol=0)
    # freezing the later MLPs changes what a restored early state does ...
    assert (cut.values[: L - 1] - plain.values[: L - 1]).abs().max() > 1e-3
    # ... but not the last layer's state (nothing after it) nor the cells before the subject
    torch.testing.assert_close(cut.values[L - 1], plain.values[L - 1], atol=TOL, rtol=0)
    torch.testing.assert_close(cut.values[:, 0], plain.values[:, 0], atol=TOL, rtol=0)
    attn = causal_trace(model, tokens, SPANS, target, site="mlp_out", window=2, sever="attn", samples=3,
                        progress=False)
    torch.testing.assert_close(attn.sample_values[1, 2], hand.cell(rome_layers(1, L, 2), 2, site="mlp_out",
                                                                   sever="attn"), atol=TOL, rtol=0)


def test_noise_mode_puts_the_corrupted_states_into_the_clean_run(model, tokens, target, hand, trace):
    r = causal_trace(model, tokens, SPANS, target, mode="noise", samples=3, progress=False)
    torch.testing.assert_close(r.baseline, trace.reference)  # the run patched into is the clean one
    torch.testing.assert_close(r.reference, trace.baseline)
    torch.testing.assert_close(r.sample_baseline, hand.p_clean[:, None].expand(2, 3), atol=TOL, rtol=0)
    torch.testing.assert_close(r.normalized[L - 1, T - 1], torch.ones(2), atol=1e-5, rtol=0)
    for layer, pos in ((0, 2), (1, 1)):
        torch.testing.assert_close(r.sample_values[layer, pos], hand.cell([layer], pos, mode="noise"),
                                   atol=TOL, rtol=0)
    cut = causal_trace(model, tokens, SPANS, target, mode="noise", sever="attn", samples=3, progress=False)
    torch.testing.assert_close(cut.sample_values[0, 2], hand.cell([0], 2, mode="noise", sever="attn"),
                               atol=TOL, rtol=0)


# ---------------------------------------------------------------------- noise draws
def test_spread_over_draws_and_the_seed(model, tokens):
    a = causal_trace(model, tokens, SPANS, samples=4, seed=5, progress=False)
    again = causal_trace(model, tokens, SPANS, samples=4, seed=5, progress=False)
    other = causal_trace(model, tokens, SPANS, samples=4, seed=6, progress=False)
    assert torch.equal(a.sample_values, again.sample_values) and torch.equal(a.sample_baseline, again.sample_baseline)
    assert not torch.allclose(a.sample_values, other.sample_values)
    assert a.spread.shape == (L, T, 2) and a.spread[0, 2].min() > 0  # the draws disagree at the subject
    assert torch.all(causal_trace(model, tokens, SPANS, samples=1, progress=False).spread == 0)
    # the draws' raw effects scatter less under less noise
    small = causal_trace(model, tokens, SPANS, samples=4, noise=0.05, seed=5, progress=False)
    assert small.sample_effect.std(-1).mean() < 0.5 * a.sample_effect.std(-1).mean()


# ---------------------------------------------------------------------- inputs, files, frames
def test_string_prompts_and_targets_through_a_subject_with_a_tokenizer(model):
    words = "paris rome tokyo is in the city of france italy japan".split()
    tok = build_word_tokenizer(words)
    assert len(tok) <= VOCAB
    prompts = ["the city of paris is in", "the city of tokyo is in"]
    s = pm.resolve(model, tokenizer=tok)
    r = causal_trace(s, prompts, (4, 5), ["france", "japan"], samples=2, progress=False)
    ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts])
    target = [tok.convert_tokens_to_ids(w) for w in ("france", "japan")]
    by_ids = causal_trace(model, ids, [(4, 5), (4, 5)], target, samples=2, progress=False)
    torch.testing.assert_close(r.sample_values, by_ids.sample_values, atol=0, rtol=0)
    assert r.str_tokens[4] == "paris"


def test_file_round_trip_and_frames(model, tokens, tmp_path):
    r = causal_trace(model, tokens, SPANS, samples=3, progress=False)
    back = PatchResult.load(r.save(tmp_path / "trace.safetensors"))
    assert torch.equal(back.sample_values, r.sample_values) and torch.equal(back.sample_baseline, r.sample_baseline)
    assert back.method == r.method and back.site == "resid_post"
    frame = r.to_frame()
    assert len(frame) == L * T and "spread" in frame
    row = frame[(frame.layer == 0) & (frame.pos == 2)].iloc[0]
    assert row["mean"] == pytest.approx(float(r.values[0, 2].mean()), abs=1e-6)
    assert row["spread"] == pytest.approx(float(r.spread[0, 2].mean()), abs=1e-6)
    assert len(r.to_frame(per_example=True)) == L * T * 2
    r.plot()
    # results of the other analyses keep their frame and files
    plain = PatchResult(values=r.values, axes=r.axes, site="resid_post", mode="denoise", method="exact-hooks",
                        baseline=r.baseline, reference=r.reference)
    assert "spread" not in plain.to_frame() and plain.spread is None and plain.sample_normalized is None
    assert PatchResult.load(plain.save(tmp_path / "plain.safetensors")).sample_values is None


def test_config_keywords_and_defaults(model, tokens):
    assert CausalTraceConfig() == CausalTraceConfig(site="resid_post", noise=3.0, samples=10, window=10, sever=None,
                                                    mode="denoise", seed=0)
    cfg = CausalTraceConfig(samples=2, site="mlp_out", window=2)
    a = causal_trace(model, tokens, SPANS, config=cfg, progress=False)
    b = causal_trace(model, tokens, SPANS, None, "mlp_out", samples=2, window=2, progress=False)
    assert torch.equal(a.sample_values, b.sample_values)


@pytest.mark.parametrize("kw, match", [
    (dict(noise=0.0), r"noise must be a number in \(0"),
    (dict(noise=-1.0), r"noise must be"),
    (dict(samples=0), r"samples must be an integer in \[1"),
    (dict(window=0), r"window must be an integer in \[1"),
    (dict(site="resid_pre"), r"site must be one of \('resid_post', 'mlp_out', 'attn_out'\)"),
    (dict(sever="heads"), r"sever must be one of \(None, 'mlp', 'attn'\)"),
    (dict(site="mlp_out", sever="mlp"), r"sever='mlp' freezes the mlp_out outputs"),
    (dict(mode="both"), r"mode must be one of"),
])
def test_bad_options(model, tokens, kw, match):
    with pytest.raises(ConfigError, match=match):
        causal_trace(model, tokens, SPANS, progress=False, **kw)


@pytest.mark.parametrize("spans, match", [
    ([(1, 3), (4, 7)], r"subject_spans\[1\] = \(4, 7\) is outside prompt 1: it has 6 tokens"),
    ([(-1, 2), (1, 2)], r"subject_spans\[0\] = \(-1, 2\) is outside"),
    ([(3, 3), (1, 2)], r"subject_spans\[0\] = \(3, 3\) is outside"),
    ([(1, 2)], r"subject_spans has 1 \(start, end\) pairs for 2 prompts"),
    ("the subject", r"subject_spans must be one \(start, end\) pair"),
])
def test_bad_spans(model, tokens, spans, match):
    with pytest.raises(ValueError, match=match):
        causal_trace(model, tokens, spans, samples=1, progress=False)


def test_bad_prompts_and_targets(model, tokens):
    with pytest.raises(ValueError, match=r"target\[1\] = 99 is not a token id in \[0, 50\)"):
        causal_trace(model, tokens, SPANS, [1, 99], samples=1, progress=False)
    with pytest.raises(ValueError, match="prompts given as strings need a tokenizer"):
        causal_trace(model, ["a b", "c d"], (0, 1), 1, samples=1, progress=False)
    tok = build_word_tokenizer("a b c".split())
    with pytest.raises(ValueError, match=r"same number of tokens.*\{3: \[0\], 4: \[1\]\}"):
        causal_trace(pm.resolve(model, tokenizer=tok), ["a b", "a b c"], (1, 2), 1, samples=1, progress=False)
    with pytest.raises(ValueError, match="prompts must be an integer tensor"):
        causal_trace(model, tokens.float(), SPANS, samples=1, progress=False)
    attn_only = small_model(vocab=VOCAB, attn_only=True)
    with pytest.raises(ValueError, match="attention-only"):
        causal_trace(attn_only, tokens, SPANS, site="mlp_out", samples=1, progress=False)
    with pytest.raises(ValueError, match="attention-only"):
        causal_trace(attn_only, tokens, SPANS, sever="mlp", samples=1, progress=False)


# ---------------------------------------------------------------------- Hugging Face bridges
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_bridges_equal_the_hand_loop(arch):
    bridge = pm.wrap_hf_model(sharpen(hf_module(arch, VOCAB, n_layers=2), seed=1))
    toks = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    spans = [(1, 3), (0, 2)]
    target = clean_top(bridge, toks)
    hand = HandTrace(bridge, toks, spans, target, samples=2)
    r = causal_trace(bridge, toks, spans, target, samples=2, progress=False)
    assert (r.reference - r.baseline).abs().max() > 0.05  # the corruption moves p(target)
    torch.testing.assert_close(r.values[1, 4], r.reference, atol=TOL, rtol=0)  # normalised 1
    torch.testing.assert_close(r.sample_baseline, hand.base, atol=TOL, rtol=0)
    for pos in (0, 2):
        torch.testing.assert_close(r.sample_values[0, pos], hand.cell([0], pos), atol=TOL, rtol=0)
    m = causal_trace(bridge, toks, spans, target, site="mlp_out", window=2, sever="attn", samples=2,
                     progress=False)
    torch.testing.assert_close(m.sample_values[1, 1], hand.cell(rome_layers(1, 2, 2), 1, site="mlp_out",
                                                                sever="attn"), atol=TOL, rtol=0)
