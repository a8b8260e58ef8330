"""The quanto QuantizedCache peer (KIVI): settings checked up front, bytes measured from the tensors quanto keeps."""

import sys

import pytest
import torch

from tests.conftest import TINY
from xkv.baselines.quantized import (
    quantization_token_multiple,
    quantized_cache,
    quantized_cache_bytes,
    quantized_memory_report,
)
from xkv.generation import greedy_generate, prefill
from xkv.memory import dense_kv_bytes
from xkv.models import stop_token_ids
from xkv.prompts import needle_sample

LAYERS = TINY["num_hidden_layers"]
HEADS = TINY["num_key_value_heads"]
HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]  # 8
FLOAT32 = 4


def hand_bytes(quantized: int, tail: int, nbits: int, group: int) -> int:
    """Bytes of the tiny model's cache: packed codes, a float32 scale and zero point per group, float32 tail."""
    numel = HEADS * quantized * HEAD_DIM  # per layer, for keys or values: (1, heads, tokens, head_dim)
    per_tensor = numel * nbits // 8 + 2 * (numel // group) * FLOAT32 + tail * HEADS * HEAD_DIM * FLOAT32
    return 2 * LAYERS * per_tensor


def context(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nbits": 3}, r"`nbits` for the quanto backend must be one of \[2, 4\] but got 3"),
        ({"nbits": 4, "axis_key": 1}, r"`axis_key` for the quanto backend must be one of \[0, -1\] but got 1"),
        ({"nbits": 4, "axis_value": 2}, r"`axis_value` for the quanto backend must be one of \[0, -1\] but got 2"),
        ({"nbits": 4, "q_group_size": 0}, r"`q_group_size` must be >= 1 but got 0"),
        ({"nbits": 4, "residual_length": 0}, r"`residual_length` must be >= 1 but got 0"),
        (
            {"nbits": 4, "axis_key": -1, "q_group_size": 16, "residual_length": 4},
            r"`residual_length` must be a multiple of 8 .* but got 4",
        ),
    ],
)
def test_settings_are_checked_when_built(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantized_cache(tiny_llama, **kwargs)


def test_missing_optimum_quanto_names_the_pip_command(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(ImportError, match=r"pip install optimum-quanto"):
        quantized_cache(tiny_llama, 4)


def test_token_multiple_follows_the_grouping(tiny_llama):
    # axis 0 groups run along head_dim then tokens (16 elements a token); axis -1 along tokens (2 heads a token).
    assert quantization_token_multiple(tiny_llama, q_group_size=16) == 1
    assert quantization_token_multiple(tiny_llama, q_group_size=64) == 4
    assert quantization_token_multiple(tiny_llama, axis_key=-1, q_group_size=16) == 8
    assert quantization_token_multiple(tiny_llama, axis_key=-1, axis_value=-1, q_group_size=64) == 32


def test_empty_cache_holds_nothing(tiny_llama):
    cache = quantized_cache(tiny_llama, 4)
    assert quantized_cache_bytes(cache) == 0
    assert quantized_memory_report(cache).held_bytes == 0


@pytest.mark.parametrize("nbits", [2, 4])
def test_bytes_match_a_hand_count_prefill_then_tail(tiny_llama, nbits):
    cache = quantized_cache(tiny_llama, nbits, q_group_size=16, residual_length=16)
    prefill(tiny_llama, context(20), cache)
    assert quantized_cache_bytes(cache) == hand_bytes(20, 0, nbits, 16)
    generated = greedy_generate(tiny_llama, context(5, seed=1), cache, 4)
    tail = 5 + generated.steps  # the question, then every generated token but the last: fewer than 16
    assert cache.get_seq_length() == 20 + tail
    assert quantized_cache_bytes(cache) == hand_bytes(20, tail, nbits, 16)


def test_a_full_tail_is_quantized_with_the_prefix(tiny_llama):
    cache = quantized_cache(tiny_llama, 4, q_group_size=16, residual_length=4)
    prefill(tiny_llama, context(20), cache)
    for token in range(6):  # the 4th decode token flushes 20 + 4 tokens; two more go to the new tail
        prefill(tiny_llama, torch.tensor([[token]]), cache)
    assert cache.get_seq_length() == 26
    assert quantized_cache_bytes(cache) == hand_bytes(24, 2, 4, 16)


def test_per_channel_keys_kivi_style(tiny_llama):
    cache = quantized_cache(tiny_llama, 2, axis_key=-1, axis_value=0, q_group_size=16, residual_length=8)
    prefill(tiny_llama, context(24), cache)  # 24 is a multiple of 8, quantization_token_multiple's answer
    for token in range(10):
        prefill(tiny_llama, torch.tensor([[token]]), cache)
    assert cache.get_seq_length() == 34
    assert quantized_cache_bytes(cache) == hand_bytes(32, 2, 2, 16)


def test_memory_report_against_dense(tiny_llama):
    cache = quantized_cache(tiny_llama, 4, q_group_size=16, residual_length=8)
    prefill(tiny_llama, context(40), cache)
    prefill(tiny_llama, context(3, seed=2), cache)
    report = quantized_memory_report(cache)
    assert report.held_bytes == quantized_cache_bytes(cache) == hand_bytes(40, 3, 4, 16)
    assert report.tail_bytes == 2 * LAYERS * 3 * HEADS * HEAD_DIM * FLOAT32
    assert report.dense_bytes == dense_kv_bytes(1, 43, LAYERS, HEADS * HEAD_DIM, torch.float32)
    # 16 float32 elements (64 bytes) become 8 bytes of codes plus 8 of scale and zero point: 4x on the prefix.
    assert report.dense_bytes / (report.held_bytes - report.tail_bytes) == pytest.approx(4 * 43 / 40)


@pytest.mark.slow
def test_int4_exceeds_4x_on_a_1k_needle_with_its_tail(smollm2):
    model, tokenizer = smollm2
    sample = needle_sample(tokenizer, 1000, seed=1)
    cache = quantized_cache(model, 4)
    prefill(model, torch.tensor([sample.context_ids]), cache)
    # The question and one decode step go to the full-precision tail (quanto's CPU unpacking makes steps slow).
    greedy_generate(model, torch.tensor([sample.question_ids]), cache, 2, stop_token_ids(tokenizer))
    report = quantized_memory_report(cache)
    assert 0 < report.tail_bytes < report.held_bytes
    assert report.held_bytes == quantized_cache_bytes(cache)
    # int4 in groups of 64 with float32 scale and zero point is 6.4x on the prefix; the float32 tail pulls it down.
    assert report.compression_factor > 4.0


@pytest.mark.parametrize("nbits", [2, 4])
def test_quantizing_a_finished_prefill_equals_quantizing_during_it(tiny_llama, nbits):
    from transformers import DynamicCache

    from xkv.baselines.quantized import dequantized_copy, quantized_from_dense

    prompt, question = context(64), context(6, seed=2)
    during = quantized_cache(tiny_llama, nbits, q_group_size=16, residual_length=32)
    prefill(tiny_llama, prompt, during)
    dense = DynamicCache()
    prefill(tiny_llama, prompt, dense)
    after = quantized_from_dense(
        tiny_llama, [(layer.keys, layer.values) for layer in dense.layers], nbits, q_group_size=16, residual_length=32
    )
    assert quantized_cache_bytes(after) == quantized_cache_bytes(during)
    copy = dequantized_copy(after)
    # Question plus answer stay below residual_length: decoding through the copy is decoding through the cache.
    assert (
        greedy_generate(tiny_llama, question, copy, 12).tokens
        == greedy_generate(tiny_llama, question, during, 12).tokens
    )


def test_per_channel_prefill_of_any_length_is_a_chunked_prefill(tiny_llama):
    from transformers import DynamicCache

    from xkv.baselines.quantized import dequantized_copy, quantized_from_dense, tail_tokens

    options = {"axis_key": -1, "axis_value": 0, "q_group_size": 16, "residual_length": 32}
    prompt, question = context(29), context(5, seed=2)  # 29 = 3 * 8 + 5: not a multiple of 8 tokens
    during = quantized_cache(tiny_llama, 2, **options)
    prefill(tiny_llama, prompt[:, :24], during)
    prefill(tiny_llama, prompt[:, 24:], during)  # the last 5 tokens go to the full-precision tail
    dense = DynamicCache()
    prefill(tiny_llama, prompt, dense)
    after = quantized_from_dense(tiny_llama, [(layer.keys, layer.values) for layer in dense.layers], 2, **options)
    assert tail_tokens(after) == tail_tokens(during) == 5
    assert quantized_cache_bytes(after) == quantized_cache_bytes(during) == hand_bytes(24, 5, 2, 16)
    assert (
        greedy_generate(tiny_llama, question, dequantized_copy(after), 6).tokens
        == greedy_generate(tiny_llama, question, during, 6).tokens
    )
    with pytest.raises(ValueError, match="shorter than one quantization block of 8 tokens"):
        quantized_from_dense(
            tiny_llama, [(k[..., :7, :], v[..., :7, :]) for k, v in dense_layers(dense)], 2, **options
        )


def dense_layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]
