"""kvpress pruning presses as peers: run through kvpress, answered at the original positions, measured in bytes."""

import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import TINY
from xkv.baselines.presses import (
    PRESSES,
    make_press,
    press_answer,
    press_cache_bytes,
    press_forward,
    press_memory_report,
    press_prefill,
    removed_fraction,
)
from xkv.generation import greedy_generate
from xkv.memory import dense_kv_bytes
from xkv.models import stop_token_ids
from xkv.prompts import needle_sample

LAYERS = TINY["num_hidden_layers"]
DIM = TINY["num_key_value_heads"] * TINY["hidden_size"] // TINY["num_attention_heads"]  # 2 heads * 8
CONTEXT = 100  # SnapKV needs more than its 64-token window

# kvpress imports `fire`, which imports the deprecated `pipes` module.
pytestmark = pytest.mark.filterwarnings("ignore:'pipes' is deprecated:DeprecationWarning")


def ids(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(seed))


def test_importing_the_modules_leaves_kvpress_unimported():
    code = (
        "import sys, xkv.baselines.presses, xkv.baselines.quantized; "
        "assert 'kvpress' not in sys.modules, 'kvpress imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_make_press_builds_the_kvpress_class_with_the_removed_fraction(name):
    import kvpress

    press = make_press(name, 4.0)
    assert type(press) is getattr(kvpress, PRESSES[name])
    assert press.compression_ratio == pytest.approx(0.75)


def test_removed_fraction_is_one_minus_the_kept_share():
    assert removed_fraction(4.0) == pytest.approx(0.75)
    assert removed_fraction(1.25) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("name", "factor", "match"),
    [
        ("h2o", 4.0, r"unknown press 'h2o'; known presses: \['expected_attention', 'keydiff', "),
        ("snapkv", 1.0, r"`compression_factor` must be > 1 \(dense / held\) but got 1.0"),
        ("knorm", 0.5, r"`compression_factor` must be > 1 \(dense / held\) but got 0.5"),
    ],
)
def test_make_press_rejects_bad_values(name, factor, match):
    with pytest.raises(ValueError, match=match):
        make_press(name, factor)


def test_missing_kvpress_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)
    with pytest.raises(ImportError, match=r"pip install kvpress"):
        make_press("knorm", 2.0)


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_every_press_prunes_to_a_quarter_and_answers(tiny_llama, name):
    pressed = press_prefill(tiny_llama, make_press(name, 4.0), ids(CONTEXT))
    assert (pressed.context_length, pressed.pressed_length) == (CONTEXT, CONTEXT // 4)
    assert all(layer.keys.shape == (1, 2, CONTEXT // 4, 8) for layer in pressed.cache.layers)
    assert press_cache_bytes(pressed.cache) == dense_kv_bytes(1, CONTEXT // 4, LAYERS, DIM, torch.float32)
    # kvpress leaves `rotary_emb` on every attention layer; press_prefill takes it off again.
    assert not any(hasattr(layer.self_attn, "rotary_emb") for layer in tiny_llama.model.layers)
    tokens = press_answer(tiny_llama, pressed, ids(5, seed=1), 4)
    assert len(tokens) == 4
    report = press_memory_report(pressed)
    assert report.held_bytes == press_cache_bytes(pressed.cache)
    assert report.dense_bytes == dense_kv_bytes(1, CONTEXT + 5 + 3, LAYERS, DIM, torch.float32)


def masked_reference(model, prompt: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Last logits of a full forward in which tokens after the context cannot see the ``dropped`` context tokens.

    Pruning after the prefill is exactly this: the context attended to everything while it was prefilled, and what
    comes after sees only the kept tokens, at their original positions.
    """
    length = prompt.shape[1]
    visible = torch.tril(torch.ones(length, length, dtype=torch.bool))
    visible[CONTEXT:, dropped] = False
    return model(input_ids=prompt, attention_mask=visible[None, None]).logits[:, -1, :]


@torch.no_grad()
def test_streaming_llm_answer_equals_a_masked_full_forward_at_original_positions(tiny_llama):
    # StreamingLLM keeps the 4 sink tokens and the most recent ones, the same in every layer and head.
    context, question = ids(CONTEXT), ids(5, seed=1)
    kept = CONTEXT // 4
    dropped = torch.arange(4, 4 + CONTEXT - kept)
    pressed = press_prefill(tiny_llama, make_press("streaming_llm", 4.0), context)
    prompt = torch.cat([context, question], dim=1)
    logits = press_forward(tiny_llama, pressed, question)
    torch.testing.assert_close(logits, masked_reference(tiny_llama, prompt, dropped), atol=1e-5, rtol=1e-5)
    answer = press_answer(tiny_llama, pressed, ids(3, seed=2), 6)
    prompt = torch.cat([prompt, ids(3, seed=2)], dim=1)
    for token in answer:
        assert token == int(masked_reference(tiny_llama, prompt, dropped).argmax(dim=-1)[0])
        prompt = torch.cat([prompt, torch.tensor([[token]])], dim=1)


def test_no_press_answers_like_the_full_cache(tiny_llama):
    context, question = ids(CONTEXT), ids(5, seed=1)
    expected = greedy_generate(tiny_llama, torch.cat([context, question], dim=1), DynamicCache(), 8).tokens
    pressed = press_prefill(tiny_llama, None, context)
    assert pressed.pressed_length == CONTEXT
    assert press_answer(tiny_llama, pressed, question, 8) == expected


def test_stop_ids_end_the_answer(tiny_llama):
    pressed = press_prefill(tiny_llama, make_press("knorm", 2.0), ids(CONTEXT))
    first = press_answer(tiny_llama, pressed, ids(5, seed=1), 1)
    pressed = press_prefill(tiny_llama, make_press("knorm", 2.0), ids(CONTEXT))
    assert press_answer(tiny_llama, pressed, ids(5, seed=1), 8, stop_ids=first) == []


@pytest.mark.parametrize(
    ("press_name", "context", "match"),
    [
        ("snapkv", ids(64), r"more than the press's `window_size` = 64 tokens but has 64"),
        ("streaming_llm", ids(4), r"more than the press's `n_sink` = 4 tokens but has 4"),
        ("knorm", torch.zeros(8, dtype=torch.long), r"`context_ids` must have shape \(batch, tokens\) but got \(8,\)"),
    ],
)
def test_press_prefill_rejects_bad_contexts(tiny_llama, press_name, context, match):
    with pytest.raises(ValueError, match=match):
        press_prefill(tiny_llama, make_press(press_name, 2.0), context)


@pytest.mark.parametrize(
    ("question", "max_new_tokens", "match"),
    [
        (torch.zeros(2, 3, dtype=torch.long), 4, r"`question_ids` must have shape \(1, tokens\) but got \(2, 3\)"),
        (ids(3), 0, r"`max_new_tokens` must be >= 1 but got 0"),
    ],
)
def test_press_answer_rejects_bad_arguments(tiny_llama, question, max_new_tokens, match):
    pressed = press_prefill(tiny_llama, None, ids(8))
    with pytest.raises(ValueError, match=match):
        press_answer(tiny_llama, pressed, question, max_new_tokens)


@pytest.mark.slow
def test_on_a_1k_needle_no_press_matches_and_snapkv_4x_holds_a_quarter(smollm2):
    model, tokenizer = smollm2
    sample = needle_sample(tokenizer, 1000, seed=1)
    context, question = torch.tensor([sample.context_ids]), torch.tensor([sample.question_ids])
    stops = stop_token_ids(tokenizer)
    expected = greedy_generate(model, torch.cat([context, question], dim=1), DynamicCache(), 10, stops).tokens
    assert press_answer(model, press_prefill(model, None, context), question, 10, stops) == expected

    pressed = press_prefill(model, make_press("snapkv", 4.0), context)
    config = model.config
    dense = dense_kv_bytes(
        1, context.shape[1], config.num_hidden_layers, config.num_key_value_heads * config.head_dim, torch.float32
    )
    assert press_cache_bytes(pressed.cache) / dense == pytest.approx(0.25, abs=0.005)
    assert press_memory_report(pressed).compression_factor == pytest.approx(4.0, rel=0.02)


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_replaying_a_captured_prefill_equals_pressing_during_it(tiny_llama, name):
    from xkv.baselines.presses import capture_prefill, replay_press

    prompt = ids(120, seed=3)
    during = press_prefill(tiny_llama, make_press(name, 4.0), prompt)
    capture = capture_prefill(tiny_llama, prompt)
    replayed = replay_press(tiny_llama, make_press(name, 4.0), capture)
    assert replayed.pressed_length == during.pressed_length
    for a, b in zip(during.cache.layers, replayed.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert capture.cache.get_seq_length() == 120  # the capture is left dense for the other methods
    assert not any(hasattr(layer.self_attn, "rotary_emb") for layer in tiny_llama.model.layers)
    with pytest.raises(ValueError, match="window_size|n_sink"):
        replay_press(tiny_llama, make_press("snapkv", 4.0), capture_prefill(tiny_llama, ids(8)))
