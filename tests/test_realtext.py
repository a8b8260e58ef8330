"""The held-out real-text task families (``xkv.evaluation.realtext``) and the calibration/report split."""

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from xkv.evaluation import realtext
from xkv.evaluation.protocol import seed_split
from xkv.evaluation.realtext import CODE_FILES, PROSE_FILES, REALTEXT_TASK_NAMES
from xkv.evaluation.tasks import TASK_GROUPS, TASK_NAMES, TaskSample, generate, parse_tasks, score_answer

# How far (fraction of the haystack) the target may sit from the sample's depth: the nearest allowed boundary is
# a sentence end (prose), an entry (JSON) or a statement (code). Measured worst cases over seeds 0-39 (depths
# spread): with SmolLM2's tokenizer at 2k, 0.019, 0.020 and 0.045; with the word tokenizer at 1024, 0.039, 0.014 and
# 0.060.
DEPTH_TOLERANCE = {"prose_needle": 0.04, "kv_json": 0.03, "code_passkey": 0.1}


class WordTokenizer:
    """Offline stand-in for a tokenizer: one token per word, punctuation mark or run of spaces; no chat template."""

    chat_template = None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab)) for p in re.findall(r"\w+|[^\w\s]|\s+", text)]}


@pytest.fixture(scope="module")
def word_tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (the converted embedded checkpoint's), without loading the model."""
    from transformers import AutoTokenizer

    from xkv.models import DEFAULT_MODEL, _converted_copy, embedded_gguf_path

    return AutoTokenizer.from_pretrained(_converted_copy(DEFAULT_MODEL, embedded_gguf_path()))


def body(sample: TaskSample) -> str:
    """The haystack with the target: the context after the preamble's blank line."""
    return sample.context.split("\n\n", 1)[1]


def locate_target(sample: TaskSample) -> float:
    """Check that the target is in the context once, as the task says, and return where (fraction of the haystack).

    Raises:
        AssertionError: if the value or its needle is missing, repeated or malformed.
    """
    (value,) = sample.answers
    assert sample.context.lower().count(value.lower()) == 1, "the value is in the context exactly once"
    text = body(sample)
    if sample.task == "prose_needle":
        word = re.search(r"access code for the (\w+) archive\?", sample.question).group(1)
        needle = f"The access code for the {word} archive is {value}. "
        assert text.count(needle) == 1 or (text.endswith(needle.rstrip()) and text.count(needle.rstrip()) == 1)
        before, after = text.split(needle.rstrip(), 1)
        assert not before or re.search(r"([.!?][\"')]* |\n\n)$", before)  # at a sentence boundary
        assert not after.strip() or after.lstrip()[0].isupper()
        words_before = len(before.split())
        return words_before / (words_before + len(after.split()))
    if sample.task == "kv_json":
        pairs = json.loads(text, object_pairs_hook=list)  # valid JSON, every pair kept (a key could repeat)
        key = re.search(r'under the key "([0-9a-f-]{36})"', sample.question).group(1)
        assert [k for k, _ in pairs].count(key) == 1 and dict(pairs)[key] == value
        full = [k for k, v in pairs if len(k) == len(v) == 36]  # a last, shortened pair is not a unit
        assert len(full) >= len(pairs) - 1
        return full.index(key) / (len(full) - 1)
    name = re.search(r"constant (PASSKEY_[A-Z]+)\?", sample.question).group(1)
    lines = text.split("\n")
    (index,) = [i for i, line in enumerate(lines) if line.lstrip().startswith(f"{name} = ")]
    assert lines[index].strip().split(" = ", 1)[1] in (value, f'"{value}"')
    files = re.split(r"^# File: .*\n", text, flags=re.MULTILINE)
    (holder,) = [i for i, code in enumerate(files) if f"{name} = " in code]
    if holder < len(files) - 1:  # a whole file (the last one is cut): the statement was put where it is valid
        ast.parse(files[holder])
    if index + 1 < len(lines):  # before a statement indented alike, or before the next file
        following = lines[index + 1]
        indent = len(lines[index]) - len(lines[index].lstrip())
        assert following.startswith("# File: ") or indent == len(following) - len(following.lstrip())
    return index / (len(lines) - 1)


def test_families_are_registered():
    assert REALTEXT_TASK_NAMES == ("prose_needle", "kv_json", "code_passkey")
    assert TASK_GROUPS["realtext"] == REALTEXT_TASK_NAMES
    assert set(REALTEXT_TASK_NAMES) <= set(TASK_NAMES)
    assert parse_tasks("realtext,niah_single_1") == [*REALTEXT_TASK_NAMES, "niah_single_1"]


def test_sources_are_pinned_stdlib_files():
    root = Path(realtext.stdlib_root())
    assert all((root / name).is_file() for name in PROSE_FILES + CODE_FILES)
    docs = realtext._prose_docs()
    paragraphs = [p for doc in docs for p in doc]
    assert len(paragraphs) > 1500  # about 80k SmolLM2 tokens of prose: a 16k sample draws from most of it
    assert all(len(p.split()) >= 12 and p[0].isupper() and ">>>" not in p and "\n" not in p for p in paragraphs)
    with pytest.raises(ValueError, match="unknown real-text task"):
        realtext.realtext_draft("essay", None, 1024, 0.5)


@pytest.mark.parametrize("task", REALTEXT_TASK_NAMES)
def test_target_is_where_the_sample_says(word_tokenizer, task):
    for index in range(5):
        encoded = generate(task, word_tokenizer, 1024, seed=30 + index, num_samples_hint=5, sample_index=index)
        sample = encoded.sample
        assert sample.depth == index / 4 and sample.sample_id == f"{task}-1024-{30 + index}"
        assert 0.98 * 1024 <= len(encoded.context_ids) + len(encoded.question_ids) <= 1024
        assert abs(locate_target(sample) - sample.depth) <= DEPTH_TOLERANCE[task]
        assert sample.answers[0].lower() not in (sample.question + sample.answer_prefix).lower()


@pytest.mark.parametrize("task", REALTEXT_TASK_NAMES)
def test_a_moved_or_repeated_target_is_caught(word_tokenizer, task):
    sample = generate(task, word_tokenizer, 1024, seed=3, num_samples_hint=2, sample_index=0).sample
    assert abs(locate_target(sample) - 0.0) <= DEPTH_TOLERANCE[task]
    (value,) = sample.answers
    repeated = replace(sample, context=sample.context + " " + value)
    with pytest.raises(AssertionError):
        locate_target(repeated)
    missing = replace(sample, context=sample.context.replace(value, value[::-1] + "x"))
    with pytest.raises(AssertionError):
        locate_target(missing)
    moved = generate(task, word_tokenizer, 1024, seed=3, num_samples_hint=2, sample_index=1).sample
    assert moved.answers == sample.answers and abs(locate_target(moved) - 1.0) <= DEPTH_TOLERANCE[task]
    assert abs(locate_target(replace(moved, depth=0.0)) - 0.0) > DEPTH_TOLERANCE[task]


@pytest.mark.parametrize("task", REALTEXT_TASK_NAMES)
def test_same_seed_same_sample_and_other_seeds_differ(word_tokenizer, task):
    first = generate(task, word_tokenizer, 768, seed=1000)
    assert generate(task, word_tokenizer, 768, seed=1000) == first
    others = [generate(task, word_tokenizer, 768, seed=seed).sample for seed in (0, 1, 1001)]
    assert len({sample.context for sample in [first.sample, *others]}) == 4
    assert len({sample.answers[0] for sample in [first.sample, *others]}) == 4
    assert len({sample.question for sample in [first.sample, *others]}) == 4


def test_samples_are_the_same_in_another_process(word_tokenizer):
    """Nothing depends on the process (e.g. str hashing): a fresh interpreter builds the same samples."""
    script = (
        "import hashlib, re\n"
        "from xkv.evaluation.tasks import generate\n"
        "class T:\n"
        "    chat_template = None\n"
        "    def __call__(self, text, add_special_tokens=False, **kw):\n"
        "        return {'input_ids': re.findall(r'\\w+|[^\\w\\s]|\\s+', text)}\n"
        "for task in ('prose_needle', 'kv_json', 'code_passkey'):\n"
        "    print(hashlib.sha256(generate(task, T(), 1024, 7).sample.context.encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    here = [hashlib.sha256(generate(t, word_tokenizer, 1024, 7).sample.context.encode()).hexdigest()
            for t in REALTEXT_TASK_NAMES]  # fmt: skip
    assert out.split() == here


def test_value_formats_vary_over_seeds(word_tokenizer):
    prose = {_format(generate("prose_needle", word_tokenizer, 512, s).sample.answers[0]) for s in range(20)}
    code = {_format(generate("code_passkey", word_tokenizer, 512, s).sample.answers[0]) for s in range(20)}
    kv = {_format(generate("kv_json", word_tokenizer, 512, s).sample.answers[0]) for s in range(3)}
    assert prose == {"digits6", "words", "hex-groups"} and code == {"digits8", "hex"} and kv == {"uuid"}


def _format(value: str) -> str:
    patterns = {
        "digits6": r"\d{6}", "digits8": r"\d{8}", "words": r"[a-z]+-[a-z]+-[a-z]+",
        "hex-groups": r"[0-9A-F]{4}(-[0-9A-F]{4}){2}", "hex": r"[0-9a-f]{12}",
        "uuid": r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}",
    }  # fmt: skip
    (kind,) = [kind for kind, pattern in patterns.items() if re.fullmatch(pattern, value)]
    return kind


@pytest.mark.parametrize("task", REALTEXT_TASK_NAMES)
def test_scoring_accepts_the_value_and_rejects_others(word_tokenizer, task):
    sample = generate(task, word_tokenizer, 512, seed=5).sample
    other = generate(task, word_tokenizer, 512, seed=6).sample
    (value,) = sample.answers
    assert score_answer(task, f" {value}.", sample.answers) == 1.0
    assert score_answer(task, f'"{value.upper()}" is the answer', sample.answers) == 1.0
    assert score_answer(task, other.answers[0], sample.answers) == 0.0
    assert score_answer(task, value[:-1], sample.answers) == 0.0  # a value cut short
    assert score_answer(task, value.replace("-", " "), sample.answers) == (0.0 if "-" in value else 1.0)
    assert score_answer(task, "I do not know.", sample.answers) == 0.0


@pytest.mark.parametrize("length", [2048, 4096])
@pytest.mark.parametrize("task", REALTEXT_TASK_NAMES)
def test_length_and_target_with_smollm2_tokenizer(smollm2_tokenizer, task, length):
    tokenizer = smollm2_tokenizer
    for seed in (0, 1000):
        encoded = generate(task, tokenizer, length, seed, num_samples_hint=20, sample_index=seed % 7)
        sample = encoded.sample
        assert 0.98 * length <= len(encoded.context_ids) + len(encoded.question_ids) <= length
        decoded = tokenizer.decode(encoded.context_ids, clean_up_tokenization_spaces=False)
        assert decoded.startswith("<|im_start|>") and decoded.endswith(sample.context)
        question = tokenizer.decode(encoded.question_ids, clean_up_tokenization_spaces=False)
        assert question.startswith("\n\n" + sample.question)
        assert question.endswith("<|im_start|>assistant\n" + sample.answer_prefix)
        assert abs(locate_target(sample) - sample.depth) <= DEPTH_TOLERANCE[task]


# ---------------------------------------------------------------------------------------------------------------------
# The calibration/report split


def test_seed_split():
    assert seed_split(range(20)) == "report"
    assert seed_split([3]) == "report"
    assert seed_split(range(1000, 1020)) == "calibration"
    assert seed_split(range(10, 30)) == "mixed"  # 20-29 are in neither split
    assert seed_split([5, 1000]) == "mixed"
    assert seed_split([500]) == "mixed"
    with pytest.raises(ValueError, match="at least one seed"):
        seed_split([])


@pytest.mark.parametrize(("first_seed", "samples", "split"), [(0, 20, "report"), (1000, 8, "calibration"),
                                                             (0, 21, "mixed")])  # fmt: skip
def test_plan_json_records_the_split(tmp_path, first_seed, samples, split):
    from xkv.evaluation.runner import EvalPlan, check_resumable

    plan = EvalPlan(tasks=["prose_needle"], lengths=[512], methods=["full"], ratios=[4.0], samples=samples,
                    out_dir=tmp_path, first_seed=first_seed)  # fmt: skip
    check_resumable(plan, "tiny")
    stored = json.loads((tmp_path / "plan.json").read_text())
    assert stored["split"] == split
    check_resumable(plan, "tiny")  # resumes
    del stored["split"]  # a plan written before the split was recorded still resumes
    (tmp_path / "plan.json").write_text(json.dumps(stored))
    check_resumable(plan, "tiny")
    stored["split"] = "calibration" if split != "calibration" else "report"  # a plan that disagrees does not
    (tmp_path / "plan.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="split"):
        check_resumable(plan, "tiny")
