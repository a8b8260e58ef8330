"""Prefix files: a compressed cache saved in one place answers the same elsewhere; bad files are refused."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import build_tiny
from xkv import XKVCache, XKVConfig, prefix
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
    "model": dict(min_tokens=0, group_size=2, rank_k="3x", rank_v="2x", factor_form="model"),
    "int4": dict(min_tokens=0, group_size=2, rank_k="3x", rank_v="2x", factor_form="int4", factor_group_size=16),
    "int4-head": dict(min_tokens=0, group_size=2, rank_k=12, rank_v=10, factor_form="int4", factor_group_size=16,
                      factor_head=4),
    "selective": dict(min_tokens=0, group_size=2, rank_k=0.5, rank_v=0.6, decode="selective", sr_chunk_size=4,
                      sr_budget=8, sr_min_tokens=0),
    "selective-bounds": dict(min_tokens=0, group_size=2, rank_k=0.5, rank_v=0.6, decode="selective",
                             sr_chunk_size=4, sr_budget=8, sr_min_tokens=0, sr_landmarks="bounds",
                             sr_select="shared"),
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
    undigested = tmp_path / "undigested.xkv"  # this version, but the digest's key is gone
    save_file(
        {"w": torch.zeros(2)},
        str(undigested),
        metadata={"xkv": json.dumps({"format": "xkv-prefix", "version": prefix.VERSION})},
    )
    with pytest.raises(PrefixFileError, match="no 'xkv_sha256' digest"):
        XKVCache.load(undigested, model)
    with pytest.raises(FileNotFoundError):
        XKVCache.load(tmp_path / "missing.xkv", model)
    with pytest.raises(RuntimeError, match="finished prefill"):
        XKVCache(model, XKVConfig(**CONFIGS["model"])).save(tmp_path / "empty.xkv")
    assert not (tmp_path / "empty.xkv").exists() and not list(tmp_path.glob("*.tmp"))


def saved_file(tmp_path, name="model", family="llama"):
    """A tiny model and the prefix file of its cache over PROMPT at CONFIGS[name]."""
    model = build_tiny(family)
    path = tmp_path / f"{name}.xkv"
    filled(model, XKVConfig(**CONFIGS[name])).save(path, prompt_ids=PROMPT)
    return model, path


def flipped(path, out, offset, mask=0x01):
    """A copy of ``path`` with the byte at ``offset`` XOR ``mask`` (0x01: a one-bit change that keeps JSON valid)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    out.write_bytes(bytes(data))
    return out


def offsets_to_flip(path):
    """Named offsets in every region of a prefix file: header length, tensor table, metadata, digest, data."""
    data = path.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")  # safetensors: 8-byte little-endian header length, JSON header

    def after(needle, start=0):
        return data.index(needle, start) + len(needle)

    return {
        "header length, lowest byte": 0,
        "header length, second byte": 1,
        "header length, highest byte": 7,
        "header's opening brace": 8,
        "a tensor's dtype": after(b'"dtype":"'),
        "a tensor's shape": after(b'"shape":['),
        "a tensor's data offsets": after(b'"data_offsets":[', after(b'"data_offsets":[')),  # the second tensor's
        "metadata: format version": after(b'version\\": '),
        "metadata: a group's rank": after(b'rank_k\\": ', data.index(b"stores")),
        "metadata: prefix length": after(b'prefix_len\\": '),
        "metadata: the config's group_size": after(b'group_size\\": '),
        "metadata: a dtype name": after(b'dtype\\": \\"'),
        "digest of the header": after(f'"{prefix.DIGEST_KEY}":"'.encode()),
        "digest of the data": after(f'"{prefix.DIGEST_KEY}":"'.encode()) + 64,
        "header's last byte (padding)": end - 1,
        "first byte of the data": end,
        "middle of the data": (end + len(data)) // 2,
        "last byte of the data": len(data) - 1,
    }


@pytest.mark.parametrize("name", ["model", "int4"])
def test_any_flipped_byte_is_refused_at_load(name, tmp_path):
    model, path = saved_file(tmp_path, name)
    XKVCache.load(path, model, prompt_ids=PROMPT)  # the file as written loads
    bad = tmp_path / "bad.xkv"
    for where, offset in offsets_to_flip(path).items():
        for mask in (0x01, 0xFF):
            with pytest.raises(PrefixFileError, match="bad.xkv") as refused:
                XKVCache.load(flipped(path, bad, offset, mask), model, prompt_ids=PROMPT)
            assert "damaged" in str(refused.value) or "not an xkv prefix file" in str(refused.value), where
    # And a sweep of the header (every 11th byte) and of the data (every 997th byte) on the reader alone.
    end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    for offset in [*range(0, end, 11), *range(end, path.stat().st_size, 997)]:
        with pytest.raises(PrefixFileError):
            prefix.read(flipped(path, bad, offset))


def rewritten(path, out, edit):
    """``path`` edited by ``edit(meta, tensors)``, written with a fresh and correct digest as an editing tool would."""
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["xkv"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    edit(meta, tensors)
    prefix.write(out, tensors, meta)
    return out


def _set(*keys_and_value):
    """An edit that sets ``meta[k1][k2]... = value``."""
    *keys, value = keys_and_value

    def edit(meta, tensors):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value

    return edit


def _tensor(name, fn):
    def edit(meta, tensors):
        if fn is None:
            del tensors[name]
        else:
            tensors[name] = fn(tensors.get(name))

    return edit


def _bump_chunk(meta, tensors):
    index = tensors["group0.sr0.exact_chunks"].clone()
    index[0, 0, 0] = 10**4
    tensors["group0.sr0.exact_chunks"] = index


#: (config, edit, the field the refusal must name): metadata that disagrees with the tensors, the model or the config.
EDITS = {
    "rank_k one higher": ("model", _set("stores", 0, "rank_k", lambda r: r + 1), r"`stores\[0\]\.rank_k` gives"),
    "rank_k past the full rank": ("model", _set("stores", 0, "rank_k", 10**6), r"`stores\[0\]\.rank_k` must be"),
    "prefix_len 10^6": ("model", _set("stores", 0, "prefix_len", 10**6), r"`stores\[0\]\.prefix_len` must be"),
    "prefix_len one lower": ("model", _set("stores", 1, "prefix_len", 63), r"`stores\[1\]\.prefix_len` gives 63"),
    "tokens 10^6": ("model", _set("tokens", 10**6), r"`layers\[0\]\.length` is 64 but `tokens` is 1000000"),
    "a layer's length": ("model", _set("layers", 2, "length", 65), r"`layers\[2\]\.length` is 65"),
    "dtype 'load'": ("model", _set("stores", 0, "dtype", "load"), r"`stores\[0\]\.dtype` must be one of .* 'load'"),
    "dtype of other tensors": ("model", _set("stores", 0, "dtype", "float16"), r"`stores\[0\]\.dtype` gives dtype"),
    "group_size 3": ("model", _set("config", "group_size", 3), r"`stores\[0\]\.layers` is \[0, 1\] but"),
    "group_size 1": ("model", _set("config", "group_size", 1), r"`stores` holds 2 groups .* makes 4"),
    "an invalid config": ("model", _set("config", "rank_k", "lots"), r"`config` does not fit"),
    "keys said exact": ("model", _set("config", "compress_keys", False), r"`stores\[0\]\.k\.form` is 'model'"),
    "a layer said dense": ("model", _set("layers", 1, "compressed", False), r"`layers\[1\]\.compressed` is false"),
    "a missing tensor": ("model", _tensor("layer3.values", None), r"`layers\[3\]` needs the tensor 'layer3.values'"),
    "an extra tensor": ("model", _tensor("group0.k.extra", lambda _: torch.zeros(3)), r"no tensor \['group0.k.extra'"),
    "a longer tail": ("model", _tensor("layer1.keys", lambda t: torch.cat([t, t.new_zeros(1, 2, 1, 8)], dim=2)),
                      r"`tokens - stores\[0\]\.prefix_len` gives 0"),
    "int4 bands": ("int4", _set("stores", 0, "k", "bands", [[4, 1]]), r"`stores\[0\]\.k\.bands` is \[\[4, 1\]\]"),
    "int4 head band": ("int4-head", _set("stores", 1, "v", "bands", lambda b: [[8, 1], [4, b[0][1] + b[1][1] - 1]]),
                       r"`stores\[1\]\.v\.bands\[0\]` gives 1"),
    "int4 dtype 'load'": ("int4", _set("stores", 0, "k", "dtype", "load"), r"`stores\[0\]\.k\.dtype` must be one of"),
    "int4 form int8": ("int4", _set("stores", 0, "v", "form", "int8"), r"`stores\[0\]\.v\.form` is .int8. but"),
    "int4 under model": ("int4", _set("config", "factor_form", "model"), r"`stores\[0\]\.k\.form` is .int4. but"),
    "int4 group size": ("int4", _set("stores", 0, "v", "group_size", 32), r"`stores\[0\]\.v\.group_size` is 32 but"),
    "a chunk index out of range": ("selective", _bump_chunk, r"`stores\[0\]\.selective\['0'\]` has chunk indices"),
    "an index the config does not build": ("selective", _set("config", "decode", "absorb"),
                                           r"`stores\[0\]\.selective` holds"),
    "another chunk size": ("selective", _set("stores", 0, "selective", "0", 8),
                           r"`stores\[0\]\.selective\['0'\]` is 8 but the config's sr_chunk_size is 4"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(EDITS))
def test_edited_metadata_with_a_correct_digest_is_refused_naming_the_field(case, tmp_path):
    name, edit, field = EDITS[case]
    model, path = saved_file(tmp_path, name)
    control = rewritten(path, tmp_path / "same.xkv", lambda meta, tensors: None)
    XKVCache.load(control, model, prompt_ids=PROMPT)  # the rewrite alone changes nothing that matters
    edited = rewritten(path, tmp_path / "edited.xkv", edit)
    prefix.read(edited)  # the digest matches: only the checks of the metadata can refuse it
    with pytest.raises(PrefixFileError, match=field) as refused:
        XKVCache.load(edited, model, prompt_ids=PROMPT)
    assert "edited.xkv" in str(refused.value)


def test_saving_where_no_file_can_be_written_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    model = build_tiny("llama")  # the cache keeps only a weak reference to it
    cache = filled(model, XKVConfig(**CONFIGS["model"]))
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    cases = {
        tmp_path / "folder": IsADirectoryError,
        tmp_path / "notes.txt" / "doc.xkv": NotADirectoryError,  # a parent that is a file: even root cannot
        tmp_path / "missing" / "doc.xkv": FileNotFoundError,
    }
    for path, error in cases.items():
        with pytest.raises(error, match=str(path).replace("\\", "\\\\")):
            cache.save(path)

    # A failure after the temporary file was written (here the rename) is reported on the user's path too.
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(prefix.os, "replace", refuse)
    with pytest.raises(PermissionError, match=r"cannot write the prefix file .*doc\.xkv'") as refused:
        cache.save(tmp_path / "doc.xkv")
    assert ".tmp" not in str(refused.value)
    assert sorted(os.listdir(tmp_path)) == ["folder", "notes.txt"] and not os.listdir(tmp_path / "folder")


@pytest.mark.slow
def test_a_prefix_file_answers_in_a_fresh_process(smollm2, tmp_path):
    from xkv.generation import greedy_generate

    model, tokenizer = smollm2
    config = XKVConfig()
    text = "The secret code is 4711. " * 105 + "Remember it."  # about 1060 tokens
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] >= config.min_tokens  # long enough to be factored, not kept exact
    question = tokenizer(" What is the secret code?", return_tensors="pt").input_ids
    path = tmp_path / "doc.xkv"
    live = XKVCache(model, config)
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(live))
    assert all(s.key_factors is not None and s.value_factors is not None for s in live.group_stores)
    ratio = live.memory_report().compression_factor
    assert ratio > 2
    live.save(path, prompt_ids=ids, tokenizer=tokenizer)
    expected = greedy_generate(model, question, live, max_new_tokens=8).tokens
    script = (
        "import sys, torch, json\n"
        "from xkv import XKVCache\nfrom xkv.models import load\nfrom xkv.generation import greedy_generate\n"
        "model, tok = load('smollm2-135m')\n"
        f"cache = XKVCache.load({str(path)!r}, model, tokenizer=tok)\n"
        "factored = all(s.key_factors is not None and s.value_factors is not None for s in cache.group_stores)\n"
        "ratio = cache.memory_report().compression_factor\n"
        f"q = torch.tensor({question.tolist()})\n"
        "print(json.dumps([factored, ratio, greedy_generate(model, q, cache, max_new_tokens=8).tokens]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600)
    factored, loaded_ratio, tokens = json.loads(out.stdout.strip().splitlines()[-1])
    assert factored and loaded_ratio == pytest.approx(ratio)
    assert tokens == expected


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


def test_a_write_removes_the_temporary_files_of_killed_writers_only(tmp_path):
    target = tmp_path / "doc.xkv"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names a process that no longer exists
    orphan = tmp_path / f".doc.xkv.{dead.pid}.tmp"
    alive = tmp_path / f".doc.xkv.{os.getppid()}.tmp"  # a running process (pytest's parent): maybe mid-write
    other = tmp_path / f".other.xkv.{dead.pid}.tmp"  # another file's
    for path in (orphan, alive, other):
        path.write_bytes(b"half a file")
    prefix.write(target, {"x": torch.zeros(2)}, {})
    assert target.is_file() and not orphan.exists()
    assert alive.exists() and other.exists()
