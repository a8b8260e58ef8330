import pytest

from xkv.prompts import is_correct, needle_sample


@pytest.mark.slow
@pytest.mark.parametrize("length", [500, 2048])
def test_needle_sample_is_well_formed(smollm2, length):
    _, tokenizer = smollm2
    sample = needle_sample(tokenizer, length, seed=4)
    text = tokenizer.decode(sample.context_ids)
    assert f"The special magic number for {sample.key} is {sample.answer}." in text
    assert 0.95 * length <= len(sample.context_ids) <= length
    assert sample.key in tokenizer.decode(sample.question_ids)
    assert needle_sample(tokenizer, length, seed=4) == sample
    assert needle_sample(tokenizer, length, seed=5).answer != sample.answer


def test_scoring_and_bad_arguments():
    assert is_correct("The number is 1234567.", "1234567")
    assert not is_correct("123456", "1234567")
    with pytest.raises(ValueError, match="context_tokens"):
        needle_sample(None, 10)
    with pytest.raises(ValueError, match="depth"):
        needle_sample(None, 100, depth=1.5)
