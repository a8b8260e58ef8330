"""The one greedy loop (``xkv.generation.decode_n_tokens``) and every caller that decodes through it."""

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import build_tiny
from xkv.generation import decode_n_tokens, greedy_generate, prefill


def scripted(rows: list[list[int]], vocab: int = 10):
    """A step whose ``k``-th call returns logits picking ``rows[k + 1]``; the ids it was fed are recorded."""
    fed: list[list[list[int]]] = []

    def logits(row: list[int]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(row), vocab).float()  # (batch, vocab)

    def step(ids: torch.Tensor) -> torch.Tensor:
        fed.append(ids.tolist())
        return logits(rows[len(fed)])

    return step, fed, logits(rows[0])


def test_a_finished_sequence_is_fed_its_last_token_and_records_nothing_more():
    step, fed, first = scripted([[1, 2], [3, 9], [4, 5], [6, 7]])
    result = decode_n_tokens(step, first, max_new_tokens=4, stop_ids=[9])
    assert result.sequences == [[1, 3, 4, 6], [2]]
    assert result.steps == 3 and fed == [[[1], [2]], [[3], [2]], [[4], [2]]]  # no step after the last token
    assert result.prefill_s == 0.0 and result.decode_s == 0.0


def test_a_sequence_stopped_at_once_is_fed_the_stop_token():
    step, fed, first = scripted([[9, 1], [2, 3]])
    result = decode_n_tokens(step, first, max_new_tokens=2, stop_ids={9})
    assert result.sequences == [[], [1, 3]] and fed == [[[9], [1]]]


@pytest.mark.parametrize(
    ("rows", "max_new_tokens", "stops", "sequences", "steps"),
    [
        ([[9]], 5, [9], [[]], 0),  # every sequence stopped: no step
        ([[4]], 1, None, [[4]], 0),  # the last token is never fed
        ([[4]], 0, None, [[]], 0),
        ([[4], [5], [6]], 3, [], [[4, 5, 6]], 2),
    ],
)
def test_max_new_tokens_and_stop_tokens(rows, max_new_tokens, stops, sequences, steps):
    step, fed, first = scripted(rows)
    result = decode_n_tokens(step, first, max_new_tokens, stops)
    assert result.sequences == sequences and result.steps == steps == len(fed)


def test_every_caller_gives_the_same_answer():
    from xkv.baselines.presses import press_answer, press_prefill
    from xkv.evaluation.methods import SampleContext, answer_through

    model = build_tiny("llama")
    gen = torch.Generator().manual_seed(3)
    context, question = torch.randint(0, 99, (1, 40), generator=gen), torch.randint(0, 99, (1, 5), generator=gen)
    whole = greedy_generate(model, torch.cat([context, question], dim=1), DynamicCache(), 10)
    assert len(whole.tokens) == 10 and whole.steps == 9 and whole.prefill_s > 0 and whole.decode_s > 0
    stop = whole.tokens[6]
    expected = whole.tokens[: whole.tokens.index(stop)]
    cache = DynamicCache()
    prefill(model, context, cache)
    ctx = SampleContext(model=model, context_ids=context, question_ids=question, stop_ids=[stop], max_new_tokens=10)
    assert answer_through(ctx, cache) == expected
    assert press_answer(model, press_prefill(model, None, context), question, 10, [stop]) == expected
    cache = DynamicCache()
    prefill(model, context, cache)
    assert greedy_generate(model, question, cache, 10, [stop]).tokens == expected
