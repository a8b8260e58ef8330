"""Faults: bad arguments and files give an ``error:`` line (exit code 2, no traceback); killed runs lose nothing.

The kill tests run ``xkv`` in a child process that pauses at a chosen point (half a prefix file or half a row
written), send it SIGKILL there, and check what is left on disk and that the next run resumes from it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xkv.cli import main
from xkv.evaluation.runner import append_line, load_rows, repair_torn_tail

MODEL_COMMANDS = {
    "demo": [],
    "ask": ["prefix.xkv", "what?"],
    "compress": ["doc.txt", "--out", "doc.xkv"],
    "eval": [],
    "bench": [],
    "tune": ["--target", "4", "--out", "tune-out"],
    "analyze": [],
}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded or fetched (the hub included: transformers' loaders)."""

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be loaded or fetched")

    monkeypatch.setattr("xkv.models.load", refuse)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def _fails_cleanly(args: list[str], capsys) -> str:
    """Run ``xkv ARGS``: exit code 2, one ``xkv CMD: error: ...`` line on stderr, no traceback; return the line."""
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xkv {args[0]}: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
@pytest.mark.parametrize("model", ["/nonexistent", "./nope", "~/no/such/model", "models/tiny/"])
def test_a_model_path_that_does_not_exist_is_named_before_anything_loads(
    command, model, tmp_path, monkeypatch, capsys, no_model_load
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text("A short document.")
    if command == "ask":  # ask reads the prefix file first: one that names a model
        monkeypatch.setattr("xkv.prefix.read", lambda path: ({}, {"model_name": "smollm2-135m"}))
    line = _fails_cleanly([command, *MODEL_COMMANDS[command], "--model", model], capsys)
    assert f"model path {model!r} does not exist" in line


def test_a_model_path_recorded_in_a_prefix_file_is_named(tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.setattr("xkv.prefix.read", lambda path: ({}, {"model_name": "./gone/model"}))
    line = _fails_cleanly(["ask", str(tmp_path / "doc.xkv"), "what?"], capsys)
    assert "model path './gone/model' does not exist" in line and "pass --model" in line


def test_what_counts_as_a_model_path(tmp_path):
    from xkv.models import check_model_source

    for hub_or_embedded in ("smollm2-135m", "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        check_model_source(hub_or_embedded)  # not a path: left to the hub
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_source(str(tmp_path / "model"))
    (tmp_path / "model" / "config.json").write_text("{}")
    check_model_source(str(tmp_path / "model"))
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        check_model_source(str(tmp_path / "model" / "config.json"))
    for path in ("/nonexistent", "./nope", "../nope", "~/nope", "a/b/c", "nope/", "owner/na me", "C:\\models\\x"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_model_source(path)
    with pytest.raises(ValueError, match="empty"):
        check_model_source(" ")


#: Bad files and arguments (run in a folder holding the files of the test below) and what the error line says.
BAD_INPUTS = [
    (["compress", "empty.txt", "--out", "out.xkv"], "'empty.txt' is empty (or only whitespace)"),
    (["compress", "blank.txt", "--out", "out.xkv"], "'blank.txt' is empty (or only whitespace)"),
    (["compress", "binary.txt", "--out", "out.xkv"], "'binary.txt' is not UTF-8 text"),
    (["compress", "missing.txt", "--out", "out.xkv"], "no document at 'missing.txt'"),
    (["compress", "doc.txt", "--out", "folder"], "`--out` 'folder' is a folder"),
    (["compress", "doc.txt", "--out", "missing/out.xkv"], "the folder 'missing' does not exist"),
    (["compress", "doc.txt", "--out", "out.xkv", "--config", "missing.yaml"], "no config file at 'missing.yaml'"),
    (["compress", "doc.txt", "--out", "out.xkv", "--config", "bad.json"], "cannot parse config file 'bad.json'"),
    (["demo", "--json", "missing/demo.json"], "the folder 'missing' does not exist"),
    (["demo", "--model", "doc.txt"], "model path 'doc.txt' is a file"),
    (["demo", "--model", "folder"], "model folder 'folder' has no config.json"),
    (["config", "--write", "missing/c.yaml"], "the folder 'missing' does not exist"),
    (["config", "missing.yaml"], "no config file at 'missing.yaml'"),
    (["eval", "--out", "doc.txt"], "`--out` 'doc.txt' is a file"),
    (["eval", "--methods", "mine=missing.yaml"], "method 'mine': no config file at 'missing.yaml'"),
    (["tune", "--target", "4", "--out", "doc.txt"], "`--out` 'doc.txt' is a file"),
    (["tune", "--target", "4", "--max-new-tokens", "0", "--out", "t"], "`--max-new-tokens` must be >= 1"),
    (["tune", "--target", "4", "--first-seed", "0", "--out", "t"], "may choose only on calibration seeds"),
    (["analyze", "--out", "doc.txt"], "`--out` 'doc.txt' is a file"),
    (["analyze", "--allocate", "0.5"], "`--allocate` takes compression factors > 1"),
    (["analyze", "--group-size", "0"], "`--group-size` must be >= 1"),
    (["bench", "--out", "doc.txt"], "`--out` 'doc.txt' is a file"),
    (["bench", "--methods", "mine=missing.yaml"], "bench method 'mine': no config file at 'missing.yaml'"),
    (["bench", "--methods", "dense=doc.txt"], "want label=config.yaml with a new label"),
    (["report", "folder", "--out", "doc.txt"], "`--out` 'doc.txt' is a file"),
    (["ask", "missing.xkv", "what?"], "no prefix file at 'missing.xkv'"),
    (["ask", "doc.txt", "what?"], "'doc.txt' is not"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUTS, ids=[" ".join(args) for args, _ in BAD_INPUTS])
def test_bad_files_and_arguments_give_one_error_line(args, expected, tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp_path / "doc.txt").write_text("A short document.")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "folder").mkdir()
    assert expected in _fails_cleanly(args, capsys)
    assert not (tmp_path / "out.xkv").exists() and not list(tmp_path.glob("*.tmp"))


def test_a_negative_thread_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--threads", "-1"])
    assert exit_info.value.code == 2
    assert "argument --threads: must be >= 0" in capsys.readouterr().err


def test_an_os_error_is_an_error_line(monkeypatch, capsys):
    """An OSError anywhere in a command (the hub unreachable, a full disk) is reported, not a traceback."""

    def unreachable(args):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("xkv.cli.cmd_demo", unreachable)
    assert "couldn't connect" in _fails_cleanly(["demo", "--model", "owner/model"], capsys)


def test_ctrl_c_is_a_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("xkv.cli.cmd_eval", interrupted)
    assert main(["eval"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "xkv eval: interrupted\n" and "Traceback" not in captured.out


# ---------------------------------------------------------------------------------------------- torn rows


def _row(i: int) -> dict:
    return {"sample_id": f"vt-512-{i}", "method": "full", "target_ratio": 1.0, "score": 1.0}


def test_a_torn_last_row_is_dropped_and_a_whole_one_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    for i in range(2):
        append_line(path, json.dumps(_row(i)).encode())
    whole = path.read_bytes()
    repair_torn_tail(path)
    assert path.read_bytes() == whole  # nothing to mend
    torn = json.dumps(_row(2)).encode()
    path.write_bytes(whole + torn[: len(torn) // 2])
    assert load_rows(path) == [_row(0), _row(1)]  # counted as not done
    repair_torn_tail(path)
    assert path.read_bytes() == whole  # the torn half is gone, not kept as a line of its own
    append_line(path, torn)
    assert load_rows(path) == [_row(0), _row(1), _row(2)]
    assert path.read_bytes().count(b"\n") == 3
    # A whole row whose newline was not written yet is counted as done and kept (with its newline).
    path.write_bytes(whole + torn)
    assert load_rows(path) == [_row(0), _row(1), _row(2)]
    repair_torn_tail(path)
    assert path.read_bytes() == whole + torn + b"\n"
    # A torn multi-byte character does not stop the rows before it from loading.
    path.write_bytes(whole + '{"sample_id": "\u00e9'.encode()[:-1])
    assert load_rows(path) == [_row(0), _row(1)]
    repair_torn_tail(path)
    assert path.read_bytes() == whole


def test_a_damaged_plan_is_named(tmp_path):
    from xkv.evaluation.runner import EvalPlan, check_resumable

    plan = EvalPlan(tasks=["vt"], lengths=[512], methods=["full"], ratios=[2.0], samples=1, out_dir=tmp_path)
    (tmp_path / "plan.json").write_text('{"model": "ti')
    with pytest.raises(ValueError, match="plan.json is damaged"):
        check_resumable(plan, "tiny")


# ------------------------------------------------------------------------------------------ killed runs


#: Run in the child: patch ``TARGET`` (module, attribute) so that its ``NTH`` call writes half of its bytes, marks
#: ``MARKER`` and waits to be killed; then run ``xkv`` with the remaining arguments.
_PAUSING_CHILD = """
import importlib, os, sys, time
module, attribute, nth, marker = sys.argv[1:5]
owner = importlib.import_module(module)
real = getattr(owner, attribute)
calls = []

def half_then_wait(*args, **kwargs):
    calls.append(args)
    if len(calls) < int(nth):
        return real(*args, **kwargs)
    path = next(arg for arg in args if isinstance(arg, (str, os.PathLike)))  # the file written
    before = os.path.getsize(path) if os.path.exists(path) else 0
    real(*args, **kwargs)  # the whole write, then cut back to half of what it added
    with open(path, "r+b") as handle:
        handle.truncate(before + (os.path.getsize(path) - before) // 2)
    open(marker, "w").close()
    time.sleep(600)

setattr(owner, attribute, half_then_wait)
from xkv.cli import main
sys.exit(main(sys.argv[5:]))
"""


def _kill_when_paused(patch: tuple[str, str, int], args: list[str], marker: Path) -> None:
    """Run ``xkv ARGS`` in a child that pauses inside the ``patch``ed writer; SIGKILL it there."""
    child = subprocess.Popen(
        [sys.executable, "-c", _PAUSING_CHILD, patch[0], patch[1], str(patch[2]), str(marker), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the child ended before the pause ({child.returncode}): {child.stderr.read().decode()}")
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    marker.unlink()


@pytest.mark.slow
def test_compress_killed_mid_write_leaves_no_partial_prefix_file(tiny_model_dir, tmp_path):
    from xkv.cache import XKVCache
    from xkv.models import load
    from xkv.prefix import read

    document = tmp_path / "doc.txt"
    # About 2.4k tokens: over min_tokens, so the file holds factors, not an exact cache.
    document.write_text(" ".join(f"Item {i} of the list costs {i * 37 % 1000} coins." for i in range(200)))
    out, marker = tmp_path / "doc.xkv", tmp_path / "paused"
    args = ["compress", str(document), "--out", str(out), "--model", str(tiny_model_dir), "--quiet", "--threads", "1"]
    # safetensors.torch.save_file writes the file that becomes the prefix file: half of it is on disk at the kill.
    writer = ("safetensors.torch", "save_file", 1)
    _kill_when_paused(writer, args, marker)
    assert not out.exists()  # no partial file at the target (a temporary one may be left beside it)

    assert main(args) == 0  # a later compress to the same path is not stopped by what the kill left
    complete = out.read_bytes()
    _, meta = read(out)
    assert meta["model_name"] == str(tiny_model_dir)
    model, tokenizer = load(str(tiny_model_dir))
    cache = XKVCache.load(out, model, tokenizer=tokenizer)
    assert cache.get_seq_length() > 1024

    _kill_when_paused(writer, args, marker)  # killed while replacing it: the complete file stays as it was
    assert out.read_bytes() == complete
    read(out)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_eval_killed_mid_row_resumes_without_a_lost_or_doubled_row(tiny_model_dir, tmp_path):
    args = [
        "eval", "--model", str(tiny_model_dir), "--tasks", "niah_single_1,vt", "--lengths", "512",
        "--methods", "full,xkv", "--ratios", "2,4", "--samples", "2", "--min-full-score", "0",
        "--max-new-tokens", "3", "--quiet", "--threads", "1",
    ]  # fmt: skip
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*args, "--out", str(reference)]) == 0
    expected = _rows(reference / "results.jsonl")
    assert len(expected) == 2 * 2 * (1 + 2)
    # Killed while writing its third row: two whole rows and half a line on disk.
    _kill_when_paused(("xkv.evaluation.runner", "append_line", 3), [*args, "--out", str(killed)], tmp_path / "paused")
    lines = (killed / "results.jsonl").read_bytes().split(b"\n")
    assert len(lines) == 3 and lines[2] and not lines[2].endswith(b"}")  # the torn third row

    assert main([*args, "--out", str(killed)]) == 0
    assert _rows(killed / "results.jsonl") == expected  # every row once, in the order of an uninterrupted run
    # Torn again by hand in the middle of the last row: the rerun mends it and writes that row once more.
    whole = (killed / "results.jsonl").read_bytes()
    (killed / "results.jsonl").write_bytes(whole[: whole.rindex(b"\n", 0, -1) + 40])
    assert main([*args, "--out", str(killed)]) == 0
    assert _rows(killed / "results.jsonl") == expected
