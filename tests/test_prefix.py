"""Prefix files: a compressed cache saved in one place answers the same elsewhere; bad files are refused."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import build_tiny
from xkv import XKVCache, XKVConfig
from xkv.compat import cache_kwargs
from xkv.prefix import PrefixFileError

PROMPT = torch.randint(0, 99, (1, 64), generator=torch.Generator().manual_seed(0))
STEPS = [torch.tensor([[t]]) for t in (5, 17, 42)]


@torch.no_grad()
def continue_from(model, cache):
    return torch.cat([model(t, use_cache=True, **cache_kwargs(cache)).logits for t in STEPS], dim=1)


@torch.no_grad()
def filled(model, cfg):
    cache = XKVCache(model, cfg)
    model(PROMPT, use_cache=True, **cache_kwargs(cache))
    return cache


CONFIGS = {
    "model": dict(min_tokens=0, group_size=2, rank_k="3x", rank_v="2x"),
    "int4": dict(min_tokens=0, group_size=2, rank_k="3x", rank_v="2x", factor_form="int4", factor_group_size=16),
    "selective": dict(min_tokens=0, group_size=2, rank_k=0.5, rank_v=0.6, decode="selective", sr_chunk_size=4,
                      sr_budget=8, sr_min_tokens=0),
    "exact-values": dict(min_tokens=0, group_size=2, rank_k="3x", compress_values=False, dense_layers=[3]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_saved_cache_answers_like_the_live_one(name, tmp_path):
    model = build_tiny("llama")
    live = filled(model, XKVConfig(**CONFIGS[name]))
    path = tmp_path / "doc.xkv"
    size = live.save(path, prompt_ids=PROMPT)
    held = live.memory_report().held_bytes
    loaded = XKVCache.load(path, model, prompt_ids=PROMPT)
    assert loaded.memory_report().held_bytes == held
    torch.testing.assert_close(continue_from(model, loaded), continue_from(model, live), atol=1e-5, rtol=1e-5)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: 8-byte length, JSON header
    assert held <= size - header <= held * 1.01


def test_bad_prefix_files_are_refused_with_their_own_message(tmp_path):
    model = build_tiny("llama")
    path = tmp_path / "doc.xkv"
    filled(model, XKVConfig(**CONFIGS["model"])).save(path, prompt_ids=PROMPT)
    with pytest.raises(PrefixFileError, match="other weights"):
        XKVCache.load(path, build_tiny("llama", seed=1))
    with pytest.raises(PrefixFileError, match="qwen2 model"):
        XKVCache.load(path, build_tiny("qwen2"))
    with pytest.raises(PrefixFileError, match="another prompt"):
        XKVCache.load(path, model, prompt_ids=PROMPT + 1)
    truncated = tmp_path / "cut.xkv"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PrefixFileError, match="truncated or damaged"):
        XKVCache.load(truncated, model)
    text = tmp_path / "notes.xkv"
    text.write_text("not a cache")
    with pytest.raises(PrefixFileError, match="not a readable prefix file"):
        XKVCache.load(text, model)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(PrefixFileError, match="not an xkv prefix file"):
        XKVCache.load(foreign, model)
    old = tmp_path / "old.xkv"
    save_file({"w": torch.zeros(2)}, str(old), metadata={"xkv": json.dumps({"format": "xkv-prefix", "version": 0})})
    with pytest.raises(PrefixFileError, match="version 0"):
        XKVCache.load(old, model)
    with pytest.raises(FileNotFoundError):
        XKVCache.load(tmp_path / "missing.xkv", model)
    with pytest.raises(RuntimeError, match="finished prefill"):
        XKVCache(model, XKVConfig(**CONFIGS["model"])).save(tmp_path / "empty.xkv")
    assert not (tmp_path / "empty.xkv").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_a_prefix_file_answers_in_a_fresh_process(smollm2, tmp_path):
    from xkv.generation import greedy_generate

    model, tokenizer = smollm2
    text = "The secret code is 4711. " * 40 + "Remember it."
    ids = tokenizer(text, return_tensors="pt").input_ids
    question = tokenizer(" What is the secret code?", return_tensors="pt").input_ids
    path = tmp_path / "doc.xkv"
    fresh = XKVCache(model, XKVConfig())
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(fresh))
    fresh.save(path, prompt_ids=ids, tokenizer=tokenizer)
    expected = greedy_generate(model, question, fresh, max_new_tokens=8).tokens
    script = (
        "import sys, torch, json\n"
        "from xkv import XKVCache\nfrom xkv.models import load\nfrom xkv.generation import greedy_generate\n"
        "model, tok = load('smollm2-135m')\n"
        f"cache = XKVCache.load({str(path)!r}, model, tokenizer=tok)\n"
        f"q = torch.tensor({question.tolist()})\n"
        "print(json.dumps(greedy_generate(model, q, cache, max_new_tokens=8).tokens))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.slow
def test_compress_then_ask_on_the_command_line(smollm2, tmp_path, capsys):
    from xkv.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("Notes from the meeting. " * 200 + "The launch code for the rocket is 5521. " + "Coffee. " * 200)
    out = tmp_path / "doc.xkv"
    assert main(["compress", str(doc), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "MiB on disk" in printed and out.is_file() and "(1.00x)" not in printed  # compressed
    assert main(["ask", str(out), "What is the launch code? Answer with the number only.", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"]
    assert "5521" in answer
    assert main(["ask", str(doc), "anything"]) == 2  # not a prefix file: refused before the model loads
    assert "not a readable prefix file" in capsys.readouterr().err
