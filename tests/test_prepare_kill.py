"""A killed preparation leaves nothing behind: its encoding processes die with it, and what it was writing
is never taken for a cache entry. Real processes, killed for real (SIGKILL), watched through /proc."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE

from data import encode_conversations, load_conversations, load_tokenizer, prepare_dataset
from data.cache import SCRATCH, SOURCE_HASHES, cache_entry
from data.prepare import SUMMARY_FILE
from data.rows import ENCODER_VERSION

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's"
)

ENV = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"} | {"WANDB_SILENT": "true"}
# the CLI's settings as prepare_dataset's: the cache key of data=sample at this max_length
SETTINGS = {"format": "messages", "lang": None, "threads": "best", "strict": False, "max_length": 256,
            "overflow": "truncate", "encoder": ENCODER_VERSION}  # fmt: skip


def large_source(path: Path, copies: int) -> Path:
    """The shipped sample ``copies`` times over, each copy's first user turn numbered: a few seconds of
    encoding with data.num_proc=2 here, and a cache key of its own."""
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    with path.open("w") as out:
        for copy in range(copies):
            for record in records:
                messages = [dict(message) for message in record["messages"]]
                messages[0]["content"] = f"({copy}) {messages[0]['content']}"
                out.write(json.dumps({**record, "id": f"{record['id']}-{copy}", "messages": messages}) + "\n")
    return path


def children(pid: int) -> dict[int, str]:
    """The living children of ``pid`` that are forks of it (the same command line), each with its start
    time, which tells the process from a later one given the same pid."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone: no children
        return {}
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, *fields = stat.read_text().rsplit(")", 1)[1].split()
            forked = (stat.parent / "cmdline").read_bytes() == command
        except OSError:
            continue
        if int(parent) == pid and state != "Z" and forked:
            found[int(stat.parent.name)] = fields[17]
    return found


def living(processes: dict[int, str]) -> list[int]:
    """Those of ``processes`` (pid → start time) still running; a zombie is not."""
    alive = []
    for pid, started in processes.items():
        try:
            state, _, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if state != "Z" and fields[17] == started:
            alive.append(pid)
    return alive


def cpu_seconds(pid: int) -> float:
    """The CPU time ``pid`` has used (user + system), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_while_encoding(command: list[str], cwd: Path) -> tuple[dict[int, str], list[int]]:
    """Start ``command``, wait until its encoding processes (datasets' two pool workers and its manager,
    forks of the main process) exist and two of them are encoding (0.2 s of CPU each; ~1 s each in all
    here), SIGKILL the main process. Returns those processes and the ones still alive 5 s later."""
    run = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(encoders := children(run.pid)) < 3 or sum(cpu_seconds(pid) >= 0.2 for pid in encoders) < 2:
            assert run.poll() is None, run.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no encoding processes within 240 s"
            time.sleep(0.05)
        assert living(encoders) == list(encoders) and run.poll() is None  # the kill lands while they encode
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 5
    while living(encoders) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = living(encoders)
    for pid in left:  # never leave them to the next test, whatever the assertion says
        os.kill(pid, signal.SIGKILL)
    return encoders, left


@pytest.mark.slow
def test_a_killed_preparation_leaves_no_process_and_the_next_run_prepares_the_same_rows(tmp_path, tokenizer):
    """Before the fix, the workers and the manager were left (reparented to init, blocked for good on the
    pool's task pipe and in the manager's serve_forever): 3 processes of ~470 MB each."""
    source, cache = large_source(tmp_path / "chats.jsonl", 20), tmp_path / "cache"
    command = [sys.executable, "-m", "data.prepare", "data=sample", f"data.path={source}",
               f"data.cache_dir={cache}", "data.num_proc=2", "data.eval_split=0",
               "training.max_length=512"]  # fmt: skip
    encoders, left = kill_while_encoding(command, REPO)
    assert len(encoders) == 3 and left == []
    # killed before anything was saved: no entry, only the write's own scratch (the streamed source and its
    # encoding), whose lock died with it; the next write removes it
    left_behind = sorted(path.name for path in cache.iterdir() if path.name != SOURCE_HASHES)
    assert len(left_behind) == 1 and left_behind[0].startswith(SCRATCH), left_behind

    again = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    (entry,) = [path for path in cache.iterdir() if path.name != SOURCE_HASHES]
    prepared, _ = prepare_dataset(source, "messages", tokenizer, max_length=512, cache_dir=cache)
    conversations = load_conversations(source, "messages").conversations
    uninterrupted, summary = encode_conversations(conversations, tokenizer, max_length=512)
    assert f"saved in {entry}" in again.stdout and len(prepared) == summary.conversations == 2520
    assert prepared["input_ids"] == uninterrupted["input_ids"]
    assert prepared["assistant_masks"] == uninterrupted["assistant_masks"]


@pytest.mark.slow
def test_a_training_run_killed_while_it_prepares_leaves_no_process(tmp_path):
    """``python -m train`` prepares in its main process (under ``accelerate launch``, in the rank that
    prepares), so its encoding processes are that process's children."""
    source = large_source(tmp_path / "chats.jsonl", 20)
    command = [sys.executable, "-m", "train", f"data.path={source}", f"data.cache_dir={tmp_path / 'cache'}",
               "data.eval_split=0", "training.report_to=[]"]  # fmt: skip
    encoders, left = kill_while_encoding(command, tmp_path)
    assert len(encoders) == 3 and left == []


# ── a write killed at any point is never a cache entry ─────────────────────────────────
KILLED_AT = """
import os, runpy, signal, sys
from pathlib import Path

def kill_at(event, args):
    # an audit hook runs before the call it reports: the process dies just before that call
    if event == {event!r} and isinstance(args[0], str) and {condition}:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(kill_at)
{run}
"""
PREPARE = """sys.argv = ["data.prepare", *{argv!r}]
runpy.run_module("data.prepare", run_name="__main__", alter_sys=True)"""
IN_SCRATCH = f"Path(args[0]).parent.name.startswith({SCRATCH!r})"
COMMIT = f"Path(args[0]).name.startswith({SCRATCH!r}) and Path(args[0]).is_dir()"


def killed(event: str, condition: str, run: str) -> subprocess.CompletedProcess:
    code = KILLED_AT.format(event=event, condition=condition, run=run)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("event", "condition", "written"),
    [
        # the rows and datasets' files are written, the summary not yet (nor the streamed work removed)
        ("open", f"{IN_SCRATCH} and Path(args[0]).name == {SUMMARY_FILE!r}",
         ["data-00000-of-00001.arrow", "dataset_info.json", "state.json", "work"]),
        # everything is written, and only the rename would make it the entry
        ("os.rename", COMMIT, ["data-00000-of-00001.arrow", "dataset_info.json", "state.json", SUMMARY_FILE]),
    ],
    ids=["before-the-summary", "before-the-rename"],
)  # fmt: skip
@pytest.mark.slow
def test_a_prepared_dataset_killed_while_saved_is_prepared_again(
    tmp_path, tokenizer, caplog, event, condition, written
):
    cache = tmp_path / "cache"
    argv = ["data=sample", f"data.cache_dir={cache}", "training.max_length=256", "data.num_proc=1"]
    result = killed(event, condition, PREPARE.format(argv=argv))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    target = cache_entry(SAMPLE, tokenizer, SETTINGS, cache)
    (scratch,) = [path for path in cache.iterdir() if path.name != SOURCE_HASHES]
    assert scratch.name.startswith(f"{SCRATCH}{target.name}-") and not target.exists()
    assert sorted(path.name for path in scratch.iterdir()) == written

    caplog.set_level(logging.INFO, logger="data")
    dataset, summary = prepare_dataset(SAMPLE, "messages", tokenizer, max_length=256, cache_dir=cache)
    assert f"preparing {SAMPLE}: not in the cache yet ({target})" in caplog.messages
    assert f"removing {scratch}, left by a write that was killed" in caplog.messages
    assert sorted(path.name for path in cache.iterdir()) == sorted([SOURCE_HASHES, target.name])
    fresh, _ = prepare_dataset(SAMPLE, "messages", tokenizer, max_length=256, cache_dir=tmp_path / "fresh")
    assert dataset["input_ids"] == fresh["input_ids"] and summary.path == str(target)


@pytest.mark.slow
def test_a_tokenizer_killed_before_its_rename_is_converted_again(tmp_path, tokenizer, caplog):
    cache = tmp_path / "tokenizer"
    run = f"from data import load_tokenizer\nload_tokenizer(cache_dir={str(cache)!r})"
    result = killed("os.rename", COMMIT, run)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    (scratch,) = cache.iterdir()
    assert scratch.name.startswith(SCRATCH) and (scratch / "tokenizer.json").is_file()

    caplog.set_level(logging.INFO, logger="data")
    converted = load_tokenizer(cache_dir=cache)
    assert f"removing {scratch}, left by a write that was killed" in caplog.messages
    (entry,) = cache.iterdir()
    assert not entry.name.startswith(SCRATCH) and (entry / "tokenizer.json").is_file()
    text = "<|start_header_id|>user<|end_header_id|>\n\nHola, ¿qué tal?<|eot_id|>"
    assert converted(text)["input_ids"] == load_tokenizer(cache_dir=cache)(text)["input_ids"]
    assert converted(text)["input_ids"] == tokenizer(text)["input_ids"]
