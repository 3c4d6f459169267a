"""Prepare at scale: a generated `messages` source of many conversations, prepared once per num_proc,
with throughput, peak memory and the size of the cache entry.

Writes N conversations (2-4 exchanges, messages mixed sentence by sentence from the shipped sample, as
``bench/prepare.py`` makes them) as JSON lines under a scratch folder, then runs ``data.prepare_dataset``
in a fresh process per num_proc setting (a cold cache each time) and prints, for each: wall time,
conversations/s, tokens/s, peak RSS and the cache entry's size on disk. Peak RSS is measured three ways:
the preparing process's own high-water mark (``VmHWM``); the largest sum of ``VmRSS`` over it and all its
descendants (datasets' map workers), sampled every 0.2 s (pages a fork shares are counted in each
process, so the sum is an upper bound); and the largest such sum of ``RssAnon``, the memory the process
tree itself holds. RSS also counts the pages of memory-mapped Arrow files read so far (page cache, which
the kernel takes back under pressure): that part grows with the data read, the anonymous part should not.

    python bench/prepare_scale.py --conversations 1000000 --num-proc 1 2 [--workdir /tmp] [--code DIR]

``--code DIR``: prepare with the ``data`` package of another checkout (a baseline), same generator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_INTERVAL = 0.2  # seconds between two samples of the process tree's RSS


def write_source(path: Path, count: int, seed: int = 0) -> int:
    """``count`` conversations as `messages` JSON lines, written as they are made; returns the bytes."""
    from prepare import conversation_maker  # bench/prepare.py: the same conversations as its benchmark

    conversation = conversation_maker(seed)
    with path.open("w", encoding="utf-8") as file:
        for _ in range(count):
            file.write(json.dumps({"messages": conversation()}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def tree_rss(pid: int) -> tuple[int, int]:
    """The summed VmRSS and RssAnon (bytes) of ``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, anonymous, stack = 0, 0, [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        if match := re.search(r"VmRSS:\s+(\d+) kB", status):
            total += int(match.group(1)) * 1024
        if match := re.search(r"RssAnon:\s+(\d+) kB", status):
            anonymous += int(match.group(1)) * 1024
    return total, anonymous


def measure(source: Path, cache: Path, num_proc: int, code: Path) -> dict:
    """One cold preparation in a fresh process, its tree's RSS sampled while it runs."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(source),
        str(cache),
        str(num_proc),
    ]
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE, text=True)
    peak, peak_anonymous = 0, 0
    while process.poll() is None:
        total, anonymous = tree_rss(process.pid)
        peak, peak_anonymous = max(peak, total), max(peak_anonymous, anonymous)
        time.sleep(SAMPLE_INTERVAL)
    wall = time.perf_counter() - start
    output = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"preparation failed ({process.returncode}):\n{output}")
    result = json.loads(output.strip().splitlines()[-1])
    size = sum(file.stat().st_size for file in cache.rglob("*") if file.is_file())
    return {**result, "wall": wall, "tree_peak": peak, "anon_peak": peak_anonymous, "cache_bytes": size}


def child(source: str, cache: str, num_proc: int) -> None:
    """Prepare ``source`` (the measured process); print its counts and its own peak RSS as JSON."""
    import logging

    from data import load_tokenizer, prepare_dataset

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    tokenizer = load_tokenizer()
    start = time.perf_counter()
    dataset, summary = prepare_dataset(
        source, "messages", tokenizer, max_length=8192, num_proc=num_proc, cache_dir=cache
    )
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    print(
        json.dumps(
            {"conversations": summary.conversations, "tokens": summary.tokens, "seconds": seconds, "hwm": hwm}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose data package prepares")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        source, cache, num_proc = options.child
        child(source, cache, int(num_proc))
        return
    workdir = Path(tempfile.mkdtemp(prefix="prepare-scale-", dir=options.workdir))
    try:
        source = workdir / "chats.jsonl"
        start = time.perf_counter()
        size = write_source(source, options.conversations)
        print(f"source: {options.conversations:,} conversations, {size / 1e9:.2f} GB "
              f"(written in {time.perf_counter() - start:.0f} s), code: {options.code}")  # fmt: skip
        print(f"{'num_proc':>8} {'wall s':>8} {'prep s':>8} {'conv/s':>8} {'tokens/s':>10} "
              f"{'VmHWM MB':>9} {'tree MB':>8} {'anon MB':>8} {'cache MB':>9} {'tokens':>13}")  # fmt: skip
        for num_proc in options.num_proc:
            cache = workdir / f"cache-{num_proc}"
            r = measure(source, cache, num_proc, options.code)
            print(
                f"{num_proc:>8} {r['wall']:>8.1f} {r['seconds']:>8.1f} "
                f"{r['conversations'] / r['seconds']:>8,.0f} {r['tokens'] / r['seconds']:>10,.0f} "
                f"{r['hwm'] / 2**20:>9,.0f} {r['tree_peak'] / 2**20:>8,.0f} {r['anon_peak'] / 2**20:>8,.0f} "
                f"{r['cache_bytes'] / 2**20:>9,.0f} "
                f"{r['tokens']:>13,}",
                flush=True,
            )
            shutil.rmtree(cache)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
