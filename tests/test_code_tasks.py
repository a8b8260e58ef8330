"""Code-completion tasks (LCC- and RepoBench-P-style) built from the standard library: targets, lengths, scoring."""

import pytest

from tests.test_tasks import WordTokenizer
from xkv.evaluation.code_tasks import (
    CODE_TASK_NAMES,
    IN_FILE_LINES,
    _read_lines,
    edit_similarity,
    exact_match,
    first_code_line,
    stdlib_root,
)
from xkv.evaluation.tasks import generate, score_answer


def source_lines(sample):
    path, line = sample.source.rsplit(":", 1)
    return _read_lines(stdlib_root() / path), int(line) - 1


@pytest.mark.parametrize("task", CODE_TASK_NAMES)
@pytest.mark.parametrize("length", [1024, 2048])
def test_the_target_is_the_next_line_of_its_source_and_the_length_fits(task, length):
    tokenizer = WordTokenizer()
    for seed in range(3):
        encoded = generate(task, tokenizer, length, seed)
        sample = encoded.sample
        assert 0.98 * length <= len(encoded.context_ids) + len(encoded.question_ids) <= length
        lines, index = source_lines(sample)
        assert sample.answers == [lines[index].strip()] and len(sample.answers[0]) >= 8
        assert not sample.answers[0].startswith("#")
        # The context ends with the lines right before the target (the current file's, for repobench_p).
        assert sample.context.endswith("".join(lines[index - 3 : index]))
        assert sample.answers[0] not in sample.question
        if task == "repobench_p":  # other files of the same package come first, each under its path
            current = sample.source.rsplit(":", 1)[0]
            assert sample.context.count("# Path: ") >= 2 and f"# Path: {current}\n" in sample.context
            assert sample.context.endswith("".join(lines[index - IN_FILE_LINES : index]))
        assert generate(task, tokenizer, length, seed) == encoded  # rebuilt exactly from its seed


def test_scoring_follows_longbench():
    target = "return self._soundpos"
    assert first_code_line("```python\n# the next line\n    return self._soundpos\n```") == target
    assert edit_similarity("```python\nreturn self._soundpos\n```", target) == 1.0
    assert exact_match("  return self._soundpos  ", target)
    partial = edit_similarity("return self.soundpos", target)
    assert 0.8 < partial < 1.0 and not exact_match("return self.soundpos", target)
    assert edit_similarity("", target) == 0.0
    assert score_answer("lcc", "return self._soundpos", [target]) == 1.0
    assert score_answer("niah_single_1", "1234567", ["1234567"]) == 1.0
