"""``xkv bench`` on a tiny model: every method runs, rows are consistent, the report files are written."""

import json

import pytest

from tests.conftest import build_tiny
from xkv.bench import BENCH_METHODS, bench_method, make_cache, run_bench, text_prompt, write_report
from xkv.config import XKVConfig


def test_bench_measures_every_method_side_by_side(tmp_path):
    model = build_tiny("llama", max_position_embeddings=1024)
    config = XKVConfig(group_size=2, min_tokens=0, sr_min_tokens=0, sr_budget=32, sr_chunk_size=8)
    labels = []
    rows = run_bench(
        model, [128, 256], list(BENCH_METHODS), steps=2, config=config, on_progress=labels.append, prefill_repeats=2
    )
    assert [(r.context, r.method) for r in rows] == [(t, m) for t in (128, 256) for m in BENCH_METHODS]
    dense = {r.context: r for r in rows if r.method == "dense"}
    for row in rows:
        assert row.decode_ms > 0 and row.prefill_s > 0 and row.peak_rss_mb > 0
        assert row.decode_vs_dense == pytest.approx(row.decode_ms / dense[row.context].decode_ms)
        assert len(row.prefill_runs) == 2 and row.prefill_s == pytest.approx(sum(row.prefill_runs) / 2)
        assert row.prefill_vs_dense == pytest.approx(row.prefill_s / dense[row.context].prefill_s)
        assert row.kv_bytes > 0
    # Every xKV path holds the factors: fewer bytes than the dense cache.
    assert all(r.kv_bytes < dense[r.context].kv_bytes for r in rows if r.method.startswith("xkv"))
    assert len(labels) == 2 * (2 * len(BENCH_METHODS) + 4)
    # Round 2 runs the methods in rotated order: the second method first.
    first = [label for label in labels if label.startswith("128 tokens")][len(BENCH_METHODS)]
    assert first == f"128 tokens: {list(BENCH_METHODS)[1]} prefill 2/2"
    md = write_report(rows, tmp_path, "xkv bench --lengths 128,256")
    text = md.read_text()
    assert "xkv bench --lengths 128,256" in text
    row = rows[0]  # the median and the range of the runs
    assert f"{row.prefill_s:.2f} ({min(row.prefill_runs):.2f}-{max(row.prefill_runs):.2f})" in text
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(rows)


def test_a_config_file_runs_as_written_beside_a_named_method(tmp_path):
    model = build_tiny("llama", max_position_embeddings=1024)
    base = XKVConfig(group_size=2, min_tokens=0, sr_min_tokens=0, sr_budget=32, sr_chunk_size=8)
    wide = tmp_path / "wide.yaml"
    XKVConfig.from_dict({**base.to_dict(), "decode": "selective", "sr_budget": 64, "sr_select": "shared"}).save(wide)
    named = make_cache(model, "xkv-selective", base)
    from_file = make_cache(model, f"wide={wide}", base)
    assert (named.config.sr_budget, named.config.sr_select) == (32, "head")
    settings = (from_file.config.sr_budget, from_file.config.sr_select, from_file.config.decode)
    assert settings == (64, "shared", "selective")
    rows = run_bench(model, [128], ["xkv-selective", f"wide={wide}"], steps=1, config=base, prefill_repeats=1)
    assert [r.method for r in rows] == ["dense", "xkv-selective", "wide"]
    assert rows[2].kv_bytes < rows[0].kv_bytes


def test_a_text_prompt_is_benched_and_widened_steps_are_counted(tmp_path):
    model = build_tiny("llama", max_position_embeddings=1024)
    tokenizer = _WordTokenizer()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(200)))
    prompt = text_prompt(tokenizer, text, 160)
    assert prompt.tolist() == [[i % 90 for i in range(160)]]
    with pytest.raises(ValueError, match="holds 200 tokens, fewer than the longest length 256"):
        text_prompt(tokenizer, text, 256)
    # Ranks as fractions: the index is not paid out of a factor's bytes, so it fits a tiny model.
    base = dict(
        group_size=2,
        min_tokens=0,
        sr_min_tokens=0,
        sr_budget=16,
        sr_chunk_size=8,
        decode="selective",
        rank_k=0.5,
        rank_v=0.6,
        sr_sink_chunks=1,
        sr_local_chunks=1,
        sr_outlier_chunks=1,
    )  # fmt: skip
    always = tmp_path / "always.yaml"
    XKVConfig(**base, sr_widen_below=1.0).save(always)  # every step widens on random weights
    never = tmp_path / "never.yaml"
    XKVConfig(**base).save(never)
    rows = run_bench(model, [128, 160], ["xkv-absorb", f"always={always}", f"never={never}"], steps=1,
                     prefill_repeats=1, prompt=prompt)  # fmt: skip
    share = {(r.context, r.method): r.widened_share for r in rows}
    assert share == {(t, m): s for t in (128, 160) for m, s in [("dense", None), ("xkv-absorb", None),
                                                                   ("always", 1.0), ("never", 0.0)]}  # fmt: skip
    assert "| 100% |" in write_report(rows, tmp_path / "out", "xkv bench --text text.txt").read_text()
    with pytest.raises(ValueError, match="fewer than the longest length 256"):
        run_bench(model, [256], ["dense"], prompt=prompt)


class _WordTokenizer:
    """``"w3 w7"`` -> ids ``[3, 7]``: enough of a tokenizer for :func:`text_prompt`."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(word[1:]) for word in text.split()]}


def test_bench_rejects_bad_config_methods(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench method 'mine': no config file"):
        bench_method(f"mine={tmp_path / 'missing.yaml'}")
    with pytest.raises(ValueError, match="new label"):
        bench_method(f"dense={tmp_path / 'x.yaml'}")
    with pytest.raises(ValueError, match="new label"):
        bench_method("mine=")
    with pytest.raises(ValueError, match="new label"):
        bench_method(f"my|label={tmp_path / 'x.yaml'}")  # would break the Markdown table
    path = tmp_path / "a.yaml"
    XKVConfig().save(path)
    assert bench_method(f"a={path}").method == "xkv-absorb"  # the shipped default decodes with absorb
    assert bench_method(f" a = {path} ").config == XKVConfig().to_dict()
    rebuild = tmp_path / "b.yaml"
    XKVConfig(decode="rebuild").save(rebuild)
    assert bench_method(f"b={rebuild}").method == "xkv"
    with pytest.raises(ValueError, match="more than once"):
        run_bench(build_tiny("llama"), [64], [f"a={path}", f"a={rebuild}"])


def test_bench_rejects_bad_arguments():
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="unknown bench method"):
        run_bench(model, [64], ["dense", "nope"])
    with pytest.raises(ValueError, match="`steps`"):
        run_bench(model, [64], ["dense"], steps=0)
    with pytest.raises(ValueError, match="`prefill_repeats`"):
        run_bench(model, [64], ["dense"], prefill_repeats=0)


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_is_measured_per_method(tmp_path):
    from xkv.bench import measure_peak, run_peak_bench, write_peak_report

    model = build_tiny("llama", max_position_embeddings=2048)
    config = XKVConfig(group_size=2, min_tokens=0, rank_k="4x", rank_v="4x")
    rows = [measure_peak(model, method, 1100, config=config) for method in ("dense", "dense-chunked", "xkv-chunked")]
    for row in rows:
        assert row.start_mb > 0 and row.start_mb - 1 <= row.prefill_peak_mb <= row.peak_mb  # counters lag ~1 MiB
    dense, dense_chunked, chunked = rows
    assert dense.kv_bytes == dense_chunked.kv_bytes
    assert chunked.kv_bytes < dense.kv_bytes / 3  # the last chunk folded too: no exact context left
    md = write_peak_report(rows, tmp_path, "xkv bench --memory").read_text()
    assert "half the KV saved" in md and "xkv bench --memory" in md
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3
    with pytest.raises(ValueError, match="unknown bench method"):
        run_peak_bench("unused", [64], ["nope"])
    with pytest.raises(ValueError, match="context length"):
        measure_peak(model, "dense", 0)


def test_peak_meter_falls_back_to_sampling_without_clear_refs(monkeypatch):
    import time

    import torch

    from xkv import bench

    def refuse() -> None:
        raise RuntimeError("no clear_refs here")

    monkeypatch.setattr(bench, "_reset_high_water", refuse)
    start = bench._rss_mb()
    with bench._PeakSampler() as meter:
        block = torch.ones(50_000_000)  # 191 MiB, held for 50 ms: the 2 ms sampler sees it
        time.sleep(0.05)
        del block
    assert meter._thread is not None and meter.peak >= start + 150


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_meter_reads_the_kernel_high_water_mark():
    import torch

    from xkv import bench

    start = bench._rss_mb()
    with bench._PeakSampler() as meter:
        block = torch.ones(50_000_000)  # 191 MiB, freed inside the block: only the high-water mark keeps it
        del block
    assert meter._thread is None and meter.peak >= start + 150


def test_bench_names_are_registry_methods_at_a_setting():
    from transformers import DynamicCache, QuantizedCache

    from xkv import XKVCache
    from xkv.bench import make_cache
    from xkv.evaluation.methods import METHODS

    assert all(entry.method in METHODS for entry in BENCH_METHODS.values())
    model = build_tiny("llama", hidden_size=64, num_attention_heads=2)  # D = 64: quanto groups of 64 fit
    # Not the defaults in the fields the bench's names set, so a dropped override shows.
    base = XKVConfig(group_size=2, min_tokens=0, svd="randomized", factor_form="model")
    assert type(make_cache(model, "dense", base)) is DynamicCache
    quantized = make_cache(model, "quantized-int4", base)
    assert isinstance(quantized, QuantizedCache) and quantized.layers[0].nbits == 4
    expected = {
        "xkv-rebuild": {"decode": "rebuild"},
        "xkv-absorb": {"decode": "absorb"},
        "xkv-selective": {"decode": "selective"},
        "xkv-exact": {"decode": "absorb", "svd": "exact"},
        "xkv-int4": {"decode": "absorb", "factor_form": "int4"},
        "xkv-chunked": {"decode": "absorb", "fold_tokens": 512, "fold_keep": 0, "fold_headroom": True},
        "xkv-former": {"decode": "selective", "factor_form": "model", "svd": "randomized"},
    }
    for name, fields in expected.items():
        cache = make_cache(model, name, base)
        assert isinstance(cache, XKVCache)
        assert cache.config == XKVConfig.from_dict({**base.to_dict(), **fields}), name
    assert make_cache(model, "xkv-absorb").config == XKVConfig()  # the shipped default is the absorb path
    with pytest.raises(ValueError, match="unknown bench method 'nope'"):
        make_cache(model, "nope")
    with pytest.raises(NotImplementedError, match="'minicache' has no cache of its own"):
        METHODS["minicache"]().new_cache(model)
