"""Long prompts for demos and tests: a generated prose haystack with one hidden fact (needle in a haystack).

The haystack is written by this module from sentence templates and word lists (no external text, no licence
question): grammatical, varied, and free of numbers, so the only 7-digit number in the context is the needle's.
The prompt is split in two token sequences: the context (compressed) and the question turn (appended after it,
uncompressed), as a chat user would ask about a document already in the cache.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_PEOPLE = [
    "the old ferryman",
    "a young botanist",
    "the village baker",
    "my grandmother",
    "the night watchman",
    "a retired sailor",
    "the new schoolteacher",
    "a travelling painter",
    "the lighthouse keeper",
    "our neighbour",
    "the archivist",
    "a quiet shepherd",
    "the station master",
    "a curious child",
    "the beekeeper",
]
_PLACES = [
    "the harbour",
    "the northern valley",
    "the market square",
    "the orchard",
    "the old library",
    "the river bend",
    "the mountain pass",
    "the salt marsh",
    "the village green",
    "the stone bridge",
    "the pine forest",
    "the abandoned mill",
    "the coastal road",
    "the walled garden",
    "the train station",
]
_THINGS = [
    "a wooden boat",
    "a basket of apples",
    "an unfinished letter",
    "a map of the coast",
    "a brass lantern",
    "a jar of honey",
    "a folded umbrella",
    "a book of poems",
    "a pair of boots",
    "a painted kite",
    "a bundle of firewood",
    "a silver spoon",
    "a loaf of bread",
    "a worn compass",
    "a box of seeds",
]
_TIMES = [
    "early in the morning",
    "after the autumn rains",
    "on a windless afternoon",
    "just before dusk",
    "during the long winter",
    "on the first warm day of spring",
    "late at night",
    "at the end of summer",
    "while the tide was going out",
    "when the bells rang for noon",
]
_ADJECTIVES = [
    "quiet",
    "crowded",
    "misty",
    "bright",
    "forgotten",
    "narrow",
    "peaceful",
    "windswept",
    "golden",
    "muddy",
]
_VERBS = ["carried", "found", "repaired", "painted", "described", "traded", "remembered", "hid", "studied", "sold"]
_TEMPLATES = [
    "{Person} {verb} {thing} near {place} {time}.",
    "{Time}, {place} was {adjective}, and {person} walked there slowly.",
    "Nobody could explain why {person} kept {thing} in {place}.",
    "People say that {place} looks {adjective} {time}, though few have seen it.",
    "{Person} once wrote that {place} is the most {adjective} corner of the country.",
    "There is a story about {thing} that {person} {verb} {time}.",
    "{Time}, {person} and {person2} met at {place} to talk about the weather.",
    "The path to {place} is {adjective}, so {person} usually brings {thing}.",
    "In the evenings {person} liked to sit by {place} and think about {thing}.",
    "{Person} never forgot the day {person2} {verb} {thing} at {place}.",
    "Visitors to {place} often notice how {adjective} it becomes {time}.",
    "According to {person}, {thing} was left at {place} long ago.",
    "{Person} {verb} {thing}, then walked past {place} without a word.",
    "The children of {place} believed that {person} could fix anything, even {thing}.",
    "{Time}, the road past {place} turned {adjective} and travellers slowed down.",
    "Some afternoons {person} {verb} {thing} while {person2} watched from {place}.",
    "It is said that {place} was once {adjective}, before {person} arrived.",
    "{Person} keeps {thing} on a shelf, a reminder of {place}.",
]


def _sentence(rng: random.Random) -> str:
    person, person2 = rng.sample(_PEOPLE, 2)
    fields = {
        "person": person,
        "person2": person2,
        "place": rng.choice(_PLACES),
        "thing": rng.choice(_THINGS),
        "time": rng.choice(_TIMES),
        "adjective": rng.choice(_ADJECTIVES),
        "verb": rng.choice(_VERBS),
    }
    fields["Person"] = fields["person"][0].upper() + fields["person"][1:]
    fields["Time"] = fields["time"][0].upper() + fields["time"][1:]
    return rng.choice(_TEMPLATES).format(**fields)


_CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Hanoi",
    "Dublin",
    "Quito",
    "Tbilisi",
    "Perth",
    "Cairo",
    "Montreal",
    "Krakow",
    "Seville",
    "Bergen",
    "Osaka",
    "Accra",
    "Tallinn",
    "Porto",
    "Sapporo",
    "Valencia",
]


@dataclass
class NeedleSample:
    """One needle-in-a-haystack prompt.

    Attributes:
        context_ids: token ids of the chat prefix and the haystack (the part that gets compressed).
        question_ids: token ids of the question and the assistant turn's opening (appended uncompressed).
        answer: the expected value (7 digits).
        key: the city the question asks about.
        depth: where the needle sits, as a fraction of the haystack.
        seed: the seed that rebuilds this sample.
    """

    context_ids: list[int]
    question_ids: list[int]
    answer: str
    key: str
    depth: float
    seed: int


def _chat_parts(tokenizer: PreTrainedTokenizerBase, question: str) -> tuple[str, str]:
    """Text before and after the context in a single user turn (chat template if the tokenizer has one)."""
    marker = "\x00CONTEXT\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{marker}\n\n{question}"}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(marker)
        return before, after
    return "", f"\n\n{question}\nAnswer:"


def document_ids(tokenizer: PreTrainedTokenizerBase, document: str) -> list[int]:
    """Token ids of a document as the start of a user turn (chat template if any), for a question asked later.

    Together with :func:`question_ids` this is the same text as one user turn holding the document and then the
    question, cut where the document ends: the document can be compressed once (``xkv compress``) and asked many
    times (``xkv ask``).
    """
    before, _ = _chat_parts(tokenizer, "")
    return tokenizer(before + document, add_special_tokens=False)["input_ids"]


def question_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids that follow :func:`document_ids`: the question, the end of the turn and the answer's opening."""
    _, after = _chat_parts(tokenizer, question)
    return tokenizer(after, add_special_tokens=False)["input_ids"]


def needle_sample(
    tokenizer: PreTrainedTokenizerBase, context_tokens: int, *, seed: int = 0, depth: float | None = None
) -> NeedleSample:
    """Build a haystack of about ``context_tokens`` tokens with one hidden fact, and the question about it.

    Args:
        tokenizer: the model's tokenizer (lengths are in its tokens).
        context_tokens: target length of the context part (chat prefix, haystack and needle), >= 64.
        seed: picks the sentences, the city, the number and (unless given) the depth.
        depth: position of the needle in ``[0, 1]``; drawn from the seed if ``None``.

    Returns:
        The sample; ``len(context_ids)`` is within a sentence (~25 tokens) of ``context_tokens``.

    Raises:
        ValueError: for ``context_tokens < 64`` or a depth outside ``[0, 1]``.
    """
    if context_tokens < 64:
        raise ValueError(f"`context_tokens` must be >= 64 but got {context_tokens}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1] but got {depth}")
    rng = random.Random(seed)
    key = rng.choice(_CITIES)
    answer = str(rng.randint(1_000_000, 9_999_999))
    depth = rng.random() if depth is None else depth
    needle = f"The special magic number for {key} is {answer}."
    question = f"What is the special magic number for {key}? Answer with the number only."
    before, after = _chat_parts(tokenizer, question)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    budget = context_tokens - count(before) - count(" " + needle)
    sentences: list[str] = []
    used = 0
    while True:
        sentence = _sentence(rng)
        cost = count(" " + sentence)
        if used + cost > budget:
            break
        sentences.append(sentence)
        used += cost
    sentences.insert(round(depth * len(sentences)), needle)
    context = before + " ".join(sentences)
    return NeedleSample(
        context_ids=tokenizer(context, add_special_tokens=False)["input_ids"],
        question_ids=tokenizer(after, add_special_tokens=False)["input_ids"],
        answer=answer,
        key=key,
        depth=depth,
        seed=seed,
    )


def is_correct(answer_text: str, expected: str) -> bool:
    """RULER-style string match: the expected value appears in the answer."""
    return expected in answer_text
