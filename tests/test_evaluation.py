import json

import pytest
import torch

from tests.conftest import build_tiny
from xkv import XKVCache
from xkv.cli import main
from xkv.evaluation.methods import SampleContext, XKVMethod, xkv_config_for
from xkv.evaluation.report import markdown_tables, summarize
from xkv.evaluation.runner import parse_lengths, parse_methods, parse_ratios
from xkv.generation import greedy_generate, prefill


def test_parsers():
    assert parse_lengths("2k, 4k,1500") == [2048, 4096, 1500]
    assert parse_ratios("2,4x,8") == [2.0, 4.0, 8.0]
    assert parse_methods("full,xkv") == ["full", "xkv"]
    with pytest.raises(ValueError, match="length 'abc'"):
        parse_lengths("2k,abc")
    with pytest.raises(ValueError, match="length '100'"):
        parse_lengths("100")
    with pytest.raises(ValueError, match="ratio '1'"):
        parse_ratios("1")
    with pytest.raises(ValueError, match="ratio 'x4y'"):
        parse_ratios("x4y")
    with pytest.raises(ValueError, match="unknown method 'h2o'"):
        parse_methods("full,h2o")


def shared_prefill_context(model, context_tokens, question_tokens, max_new_tokens, seed) -> SampleContext:
    """A sample's context as the runner builds it: one captured dense prefill shared by every method."""
    from xkv.baselines.presses import capture_prefill

    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, 99, (1, context_tokens), generator=gen)
    question = torch.randint(0, 99, (1, question_tokens), generator=gen)
    capture = capture_prefill(model, context)
    return SampleContext(
        model=model,
        context_ids=context,
        question_ids=question,
        stop_ids=[],
        max_new_tokens=max_new_tokens,
        dense=[(layer.keys, layer.values) for layer in capture.cache.layers],
        last_logits=capture.last_logits,
        capture=capture,
    )


def test_xkv_config_for_splits_keys_twice_as_hard():
    config = xkv_config_for(4.0)
    assert (config.rank_k, config.rank_v) == ("6x", "3x")
    assert xkv_config_for(8.0, key_share=3.0).rank_k == "16x"
    assert 2 / (1 / 16 + 1 / float(xkv_config_for(8.0, key_share=3.0).rank_v[:-1])) == pytest.approx(8.0, abs=1e-3)


def test_evaluation_path_equals_decoding_through_the_cache():
    model = build_tiny("llama")
    ctx = shared_prefill_context(model, context_tokens=120, question_tokens=6, max_new_tokens=10, seed=0)
    context, question = ctx.context_ids, ctx.question_ids
    method = XKVMethod()
    outcome = method.run(ctx, 4.0)
    cache = XKVCache(model, method.config_for(4.0))
    prefill(model, context, cache)
    held = cache.memory_report().held_bytes
    expected = greedy_generate(model, question, cache, 10, []).tokens
    assert outcome.tokens == expected
    assert outcome.held_bytes == held
    assert outcome.compression_factor >= 4.0


def _row(task, method, ratio, score, measured=None, status="ok", seed=0):
    return {
        "sample_id": f"{task}-2048-{seed}",
        "task": task,
        "length": 2048,
        "seed": seed,
        "method": method,
        "target_ratio": ratio,
        "status": status,
        "score": score,
        "measured_ratio": measured,
    }


def test_summary_drops_weak_tasks_and_marks_unreachable():
    rows = [
        _row("a", "full", 1.0, 1.0, 1.0),
        _row("a", "full", 1.0, 1.0, 1.0, seed=1),
        _row("b", "full", 1.0, 0.0, 1.0),
        _row("b", "full", 1.0, 0.5, 1.0, seed=1),
        _row("a", "xkv", 4.0, 1.0, 4.1),
        _row("a", "xkv", 4.0, 0.0, 4.1, seed=1),
        _row("b", "xkv", 4.0, 1.0, 4.1),
        _row("a", "minicache", 4.0, None, None, status="unreachable"),
    ]
    summary = summarize(rows, min_full_score=0.5)
    data = summary["lengths"]["2048"]
    assert data["kept"] == ["a"] and data["dropped"] == {"b": 0.25}
    xkv = next(e for e in data["rows"] if e["method"] == "xkv")
    assert xkv["average"] == 0.5 and xkv["standard_error"] == pytest.approx(0.5)
    assert xkv["measured_ratio"] == pytest.approx(4.1)
    assert next(e for e in data["rows"] if e["method"] == "minicache")["unreachable"]
    table = markdown_tables(summary)
    assert "| xkv | 4x | 50 | 50.0 +- 50.0 | 4.10x | 2 |" in table
    # The overview first: methods x targets, full repeated across, xkv and svd ahead of the other methods.
    assert (
        "| method | 4x |\n|---|---|\n| full | 100.0 (1.00x) |\n| xkv | 50.0 (4.10x) |\n| minicache | unreachable |"
        in table
    )
    assert "unreachable" in table and "b (25%, n=2)" in table


def test_summary_flags_averages_that_do_not_compare():
    rows = [
        _row("a", "full", 1.0, 1.0, 1.0),
        _row("b", "full", 1.0, 1.0, 1.0),
        _row("a", "xkv", 8.0, 1.0, 8.1),
        _row("a", "xkv", 8.0, None, None, seed=1, status="unreachable"),
        _row("a", "quantized", 8.0, 0.0, 6.6),
        _row("b", "quantized", 8.0, 1.0, 6.6),
    ]
    data = summarize(rows)["lengths"]["2048"]
    xkv = next(e for e in data["rows"] if e["method"] == "xkv")
    assert xkv["missing_tasks"] == ["b"] and xkv["unreachable_samples"] == 1 and not xkv["below_target"]
    quantized = next(e for e in data["rows"] if e["method"] == "quantized")
    assert quantized["below_target"] and quantized["average"] == 0.5 and not quantized["missing_tasks"]
    table = markdown_tables(summarize(rows))
    assert "| xkv | 8x | 100 | — | 100.0 +- 0.0 (1 tasks missing; 1 samples unreachable) | 8.10x | 2 |" in table
    assert "6.60x (below target)" in table
    complete = summarize(rows, complete_only=True)["lengths"]["2048"]
    assert complete["kept"] == ["a"] and complete["left_out"] == {"b": 1.0}  # xkv has no row for b
    rows.append(_row("b", "xkv", 8.0, 1.0, 8.1))
    complete = summarize(rows, complete_only=True)["lengths"]["2048"]
    assert complete["kept"] == ["a", "b"] and not complete["left_out"]
    assert "Left out" in markdown_tables(summarize(rows[:-1], complete_only=True))


def test_missing_packages_are_named_before_the_model_loads(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kvpress" else real(name, *a))
    monkeypatch.setattr("xkv.models.load", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["eval", "--methods", "full,snapkv"]) == 2
    assert "snapkv needs the package 'kvpress'" in capsys.readouterr().err


def test_bad_arguments_fail_before_the_model_loads(monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("xkv.models.load", no_load)
    for args, field in [
        (["--tasks", "niah_single_9"], "niah_single_9"),
        (["--methods", "full,h2o"], "h2o"),
        (["--ratios", "0.5"], "0.5"),
        (["--lengths", "2q"], "2q"),
        (["--haystack", "/nonexistent/file.txt"], "file.txt"),
        (["--quantized-axes", "1,0"], "--quantized-axes"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--min-full-score", "2"], "--min-full-score"),
        (["--sample", "niah_single_1-2k-3"], "TASK-LENGTH-SEED"),
        (["--sample", "niah_single_1-2048-25", "--samples", "20"], "seed 25 is not among"),
    ]:
        assert main(["eval", *args]) == 2
        assert field in capsys.readouterr().err


@pytest.mark.slow
def test_eval_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = [
        "eval", "--model", str(tiny_model_dir), "--tasks", "niah_single_1,vt", "--lengths", "512",
        "--methods", "full,xkv,svd,minicache,quantized,snapkv", "--ratios", "2,64", "--samples", "2",
        "--out", str(out), "--min-full-score", "0", "--max-new-tokens", "4", "--quantized-axes=-1,0", "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * (1 + 5 * 2)
    # 64x: beyond single-layer SVD at 512 tokens (G*T*D / (T + G*D) < 64 at rank 1), int2 and MiniCache (< 2x
    # anywhere); xKV's 4-layer group and SnapKV get there.
    unreachable = {r["method"] for r in rows if r["status"] == "unreachable"}
    assert unreachable == {"svd", "quantized", "minicache"}
    assert {r["method"] for r in rows if r["target_ratio"] == 64.0 and r["status"] == "ok"} == {"snapkv", "xkv"}
    assert all(r["measured_ratio"] >= 1.99 for r in rows if r["target_ratio"] == 2.0 and r["status"] == "ok")
    assert all(r["axis_key"] == -1 for r in rows if r["method"] == "quantized" and r["status"] == "ok")
    assert all(r["measured_ratio"] >= 0.99 * r["target_ratio"] for r in rows if r["status"] == "ok")
    summary = json.loads((out / "summary.json").read_text())
    methods = {e["method"] for e in summary["lengths"]["512"]["rows"]}
    assert methods == {"full", "xkv", "svd", "minicache", "quantized", "snapkv"}
    assert (out / "results.md").read_text().startswith("### 512 tokens")
    assert (out / "accuracy_vs_ratio.png").stat().st_size > 0
    # A rerun resumes: nothing is run twice.
    assert main(args) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    # Rows made another way are never mixed in.
    assert main([*args, "--max-new-tokens", "5"]) == 2
    # Without screening, every method runs in one pass per sample, in the same rows.
    one_pass = tmp_path / "one-pass"
    assert (
        main([*args[: args.index("--out")], "--out", str(one_pass), *args[args.index("--out") + 2 :], "--no-screen"])
        == 0
    )
    again = [json.loads(line) for line in (one_pass / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in again[:11]] == [r["method"] for r in rows if r["sample_id"] == again[0]["sample_id"]]
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in sorted(again, key=_row_order)] == [
        {k: v for k, v in r.items() if k not in strip} for r in sorted(rows, key=_row_order)
    ]

    # A replay of one sample, into a fresh folder, runs every method on it and reproduces its rows.
    replayed = rows[-1]["sample_id"]
    replay = tmp_path / "replay"
    assert (
        main(
            [
                *args[: args.index("--out")],
                "--out",
                str(replay),
                *args[args.index("--out") + 2 :],
                "--sample",
                replayed,
            ]
        )
        == 0
    )
    again_rows = [json.loads(line) for line in (replay / "results.jsonl").read_text().splitlines()]
    original = {(r["method"], r["target_ratio"]): r for r in rows if r["sample_id"] == replayed}
    assert {(r["method"], r["target_ratio"]) for r in again_rows} == set(original)
    for r in again_rows:
        first = original[(r["method"], r["target_ratio"])]
        assert (r["status"], r.get("prediction"), r["score"]) == (
            first["status"],
            first.get("prediction"),
            first["score"],
        )
    # One report over several runs: the same table as the run's own; the same samples twice are refused.
    merged = tmp_path / "merged"
    assert main(["report", str(out), "--out", str(merged), "--min-full-score", "0"]) == 0
    merged_md, own_md = (merged / "results.md").read_text(), (out / "results.md").read_text()
    assert merged_md.split("\nWritten by")[0] == own_md.split("\nWritten by")[0]
    assert merged_md.endswith(f"Written by `xkv report {out} --out {merged} --min-full-score 0`\n")
    # The same samples in two runs count once when their results agree (e.g. the full cache every run repeats),
    # and are refused when they do not.
    assert main(["report", str(out), str(one_pass), "--out", str(merged), "--min-full-score", "0"]) == 0
    assert (merged / "results.md").read_text().split("\nWritten by")[0] == own_md.split("\nWritten by")[0]
    changed = [json.loads(line) for line in (one_pass / "results.jsonl").read_text().splitlines()]
    changed[0]["score"] = 1.0 - changed[0]["score"]
    (one_pass / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
    assert main(["report", str(out), str(one_pass), "--out", str(merged)]) == 2
    assert main(["report", str(tmp_path / "nothing"), "--out", str(merged)]) == 2

    # Screening stops on a task as soon as the full cache cannot reach the threshold (the random model scores 0).
    screened = tmp_path / "screened"
    strict = [*args[: args.index("--out")], "--out", str(screened), *args[args.index("--out") + 2 :]]
    assert main([*strict, "--min-full-score", "0.75"]) == 0
    kept = [json.loads(line) for line in (screened / "results.jsonl").read_text().splitlines()]
    assert [(r["task"], r["method"]) for r in kept] == [("niah_single_1", "full"), ("vt", "full")]
    assert "niah_single_1 (0%, n=1)" in (screened / "results.md").read_text()


def _row_order(row):
    return row["sample_id"], row["method"], row["target_ratio"]


def test_press_and_quantized_paths_equal_their_own_prefill():
    from xkv.baselines.presses import make_press, press_answer, press_prefill
    from xkv.baselines.quantized import quantized_cache
    from xkv.evaluation.methods import METHODS

    model = build_tiny("llama", hidden_size=64, num_attention_heads=2)  # D = 64: quanto groups of 64 fit
    ctx = shared_prefill_context(model, context_tokens=160, question_tokens=5, max_new_tokens=8, seed=4)
    context, question = ctx.context_ids, ctx.question_ids
    pressed = press_prefill(model, make_press("snapkv", 4.0), context)
    assert METHODS["snapkv"]().run(ctx, 4.0).tokens == press_answer(model, pressed, question, 8)
    cache = quantized_cache(model, 4)
    prefill(model, context, cache)
    assert METHODS["quantized"]().run(ctx, 4.0).tokens == greedy_generate(model, question, cache, 8).tokens


def test_per_channel_quantized_keeps_a_long_question_exact():
    """A prefill remainder plus a long question would overflow a 128-token tail; the default residual holds them."""
    from xkv.baselines.quantized import quantized_cache
    from xkv.evaluation.methods import METHODS

    model = build_tiny("llama", hidden_size=64, num_attention_heads=2)  # per-channel blocks of 32 tokens
    ctx = shared_prefill_context(model, context_tokens=190, question_tokens=110, max_new_tokens=8, seed=5)
    outcome = METHODS["quantized"](axis_key=-1, axis_value=0).run(ctx, 4.0)
    # 190 = 5 * 32 + 30: 30 tokens stay exact, then 110 + 8 + 1 more must fit: 160 tokens, a multiple of 32.
    assert outcome.details["residual_length"] == 160
    cache = quantized_cache(model, 4, axis_key=-1, residual_length=160)
    prefill(model, ctx.context_ids[:, :160], cache)
    prefill(model, ctx.context_ids[:, 160:], cache)
    assert outcome.tokens == greedy_generate(model, ctx.question_ids, cache, 8).tokens


def test_only_an_unreachable_ratio_is_reported_as_unreachable():
    from xkv.config import UnreachableRatioError
    from xkv.evaluation.methods import METHODS

    model = build_tiny("llama")
    ctx = shared_prefill_context(model, context_tokens=24, question_tokens=3, max_new_tokens=2, seed=1)
    with pytest.raises(UnreachableRatioError, match="cannot reach"):
        METHODS["xkv"]().run(ctx, 200.0)
    ctx = shared_prefill_context(model, context_tokens=24, question_tokens=3, max_new_tokens=2, seed=1)
    ctx.dense = ctx.dense[:-1]  # a bug, not a ratio out of reach: it must surface
    with pytest.raises(ValueError, match="layers but the model has") as raised:
        METHODS["xkv"]().run(ctx, 2.0)
    assert not isinstance(raised.value, UnreachableRatioError)  # the runner would report it as unreachable


def test_config_files_run_as_methods_and_keep_their_split(tmp_path):
    from xkv import XKVConfig
    from xkv.evaluation.methods import build_method, key_share_of
    from xkv.evaluation.runner import parse_method_files

    path = tmp_path / "tuned.yaml"
    XKVConfig(rank_k="12x", rank_v="4x", factor_form="int4", group_size=4).save(path)
    names, configs = parse_method_files(f"full, tuned={path}")
    assert names == ["full", "tuned"] and configs["tuned"].factor_form == "int4"
    assert key_share_of(configs["tuned"]) == pytest.approx(3.0)
    method = build_method("tuned", {"config": configs["tuned"]})
    assert method.name == "tuned"
    at_six = method.config_for(6.0)  # the file's 6x split (12x/4x) runs exactly at 6x, scaled at other factors
    assert (at_six.rank_k, at_six.rank_v, at_six.factor_form, at_six.group_size) == ("12x", "4x", "int4", 4)
    assert method.config_for(12.0).rank_k == "24x"
    with pytest.raises(ValueError, match="must be new"):
        parse_method_files(f"xkv={path}")
    with pytest.raises(ValueError, match="names a method twice"):
        parse_method_files("full,xkv,xkv")
    with pytest.raises(FileNotFoundError):
        parse_method_files(f"tuned={tmp_path / 'missing.yaml'}")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method("nope", {})


def test_tune_axes_parse_and_name_bad_input():
    from xkv.evaluation.tune import DEFAULT_AXES, candidate, label, parse_axes

    assert parse_axes(None) == DEFAULT_AXES
    assert parse_axes("factor_form=int4/int8, key_share=1/3, group_size") == {
        "factor_form": ["int4", "int8"], "key_share": [1.0, 3.0], "group_size": [8, 4],
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown tune axis 'bits'"):
        parse_axes("bits=4")
    with pytest.raises(ValueError, match="group_size"):
        parse_axes("group_size=four")
    from xkv import XKVConfig

    choice = {"group_size": 4, "factor_form": "int8", "factor_group_size": 32, "factor_rotation": "none"}
    choice["key_share"] = 3
    config = candidate(XKVConfig(), 8.0, choice)
    assert (config.group_size, config.factor_form, config.rank_k) == (4, "int8", "16x")
    assert label(choice) == "G4-int8-s32-none-k3"


@pytest.mark.slow
def test_tune_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    from xkv import XKVConfig

    out = tmp_path / "tune"
    args = [
        "tune", "--model", str(tiny_model_dir), "--target", "4", "--tasks", "niah_single_1", "--length", "512",
        "--samples", "1", "--axes", "factor_form=int4/int8,factor_rotation=none/hadamard", "--max-new-tokens", "2",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "tune.json").read_text())
    assert [c["label"] for c in result["candidates"]][:2] == ["G8-int4-s64-none-k2", "G8-int8-s64-none-k2"]
    assert len(result["candidates"]) == 3  # the second axis adds one rotation to the first axis' winner
    assert all(c["measured_ratio"] >= 4.0 * 0.98 for c in result["candidates"])
    best = XKVConfig.load(out / "best.yaml")
    assert best.to_dict() == result["best"]["config"]
    assert (out / "best.yaml").read_text().startswith("# Written by xkv tune for 4x")
    before = sorted(p.name for p in out.iterdir())
    rows = sum(len((out / d / "results.jsonl").read_text().splitlines()) for d in before if (out / d).is_dir())
    assert main(args) == 0  # a rerun resumes: no new rows
    assert rows == sum(len((out / d / "results.jsonl").read_text().splitlines()) for d in before if (out / d).is_dir())


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    args = [
        "eval", "--model", str(tiny_model_dir), "--tasks", "niah_single_1,vt", "--lengths", "512",
        "--methods", "full,xkv,quantized", "--ratios", "2,4", "--samples", "3", "--min-full-score", "0",
        "--max-new-tokens", "3", "--quantized-axes=-1,0", "--quiet", "--threads", "1",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "xkv.cli", *args, "--out", str(two)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the rows of 2 processes, merged" in proc.stdout.replace("\n", " ")

    def rows(path):
        lines = (path / "results.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert rows(two) == rows(one)  # row for row, in the same order
    assert not list(two.glob("results.rank*.jsonl"))
    summary = lambda path: json.loads((path / "summary.json").read_text())  # noqa: E731
    assert summary(two) == summary(one)


def test_xkv_config_for_reaches_low_factors():
    config = xkv_config_for(1.3)
    f_k, f_v = float(config.rank_k[:-1]), float(config.rank_v[:-1])
    assert f_v >= 1.05 and 2 / (1 / f_k + 1 / f_v) == pytest.approx(1.3, abs=1e-2)
    assert (xkv_config_for(4.0).rank_k, xkv_config_for(4.0).rank_v) == ("6x", "3x")


def test_a_run_made_with_other_xkv_defaults_is_not_resumed(tmp_path):
    import json

    from xkv.evaluation.runner import EvalPlan, check_resumable

    plan = EvalPlan(tasks=["niah_single_1"], lengths=[256], methods=["full", "xkv"], ratios=[4.0], samples=1,
                    out_dir=tmp_path)  # fmt: skip
    check_resumable(plan, "tiny")
    check_resumable(plan, "tiny")  # the same settings resume
    stored = json.loads((tmp_path / "plan.json").read_text())
    stored["xkv_defaults"]["svd"] = "randomized"  # e.g. made before the default SVD became exact again
    (tmp_path / "plan.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="xkv_defaults"):
        check_resumable(plan, "tiny")


def test_merging_runs_compares_the_xkv_defaults_they_recorded(tmp_path):
    from xkv.evaluation.runner import merge_runs

    def run(name, defaults, method):
        folder = tmp_path / name
        folder.mkdir()
        plan = {"model": "m", "question_in_context": False, "max_new_tokens": 8, "haystack_sha256": "h",
                "method_options": {}, "xkv_defaults": defaults}  # fmt: skip
        (folder / "plan.json").write_text(json.dumps(plan))
        row = {"sample_id": "t-2048-0", "method": method, "target_ratio": 4.0, "status": "ok", "prediction": "x",
               "score": 1.0, "measured_ratio": 4.0}  # fmt: skip
        (folder / "results.jsonl").write_text(json.dumps(row) + "\n")
        return folder

    old = run("old", None, "a")  # made before plans recorded the defaults
    new = run("new", {"svd": "randomized"}, "b")
    assert [r["method"] for r in merge_runs([old, new])] == ["a", "b"]
    other = run("other", {"svd": "exact"}, "c")
    with pytest.raises(ValueError, match="xkv_defaults"):
        merge_runs([new, other])
    with pytest.raises(ValueError, match="xkv_defaults"):  # an unrecorded first run does not hide the others
        merge_runs([old, new, other])


def test_config_files_with_other_index_settings_each_decode_with_their_own_index(monkeypatch):
    # One sample, two config-file methods that differ only in the Selective Reconstruction index (chunk size and
    # landmarks): each must decode selectively with its own index, not with the other's or (silently) with "absorb".
    from xkv import XKVConfig
    from xkv.evaluation.methods import build_method

    model = build_tiny("llama")
    ctx = shared_prefill_context(model, context_tokens=96, question_tokens=4, max_new_tokens=2, seed=0)
    base = dict(min_tokens=0, group_size=2, svd="exact", decode="selective", sr_min_tokens=0, sr_budget=8,
                sr_sink_chunks=1, sr_local_chunks=1, sr_outlier_chunks=2, sr_max_share=1.0,
                factor_form="model")  # fmt: skip
    configs = {
        "c4": XKVConfig(**base, sr_chunk_size=4),
        "c8-bounds": XKVConfig(**base, sr_chunk_size=8, sr_landmarks="bounds"),
    }
    compressed = {}
    original = XKVMethod._compress

    def keep(self, sample, config):
        compressed[self.name] = cache = original(self, sample, config)
        return cache

    monkeypatch.setattr(XKVMethod, "_compress", keep)
    for name, config in configs.items():
        build_method(name, {"config": config}).run(ctx, 2.0)
    for name, config in configs.items():
        stores = compressed[name].group_stores
        assert all(store.decode_path(0) == "selective" for store in stores), name
        index = stores[0].selective[0]
        assert index.chunk_size == config.sr_chunk_size and index.bounds == (config.sr_landmarks == "bounds")
