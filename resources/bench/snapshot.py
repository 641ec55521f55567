#!/usr/bin/env python3
"""Snapshots of the default Linux guest: a cold boot against a restore, in one run.

  cold_s        spawn -> a booted guest's shell printing READY on the serial console, ready to
                read a line (the snapshot is taken after that, outside the measurement)
  warm_s        spawn of `ember run --restore` of a snapshot taken while that shell waited ->
                its answer to a line sent at once (so a round trip more than cold_s)
  pause_ms      how long the snapshot paused the VM (ember's answer to PUT /vm/snapshot)
  written_mib   guest RAM written to the memory file (sparse: touched pages only)

Runs are interleaved (cold, warm, cold, ...). Prints a Markdown table and writes it to
--markdown, with the raw samples in --json. Needs /dev/kvm and the default guest
(resources/build-guest.sh). Python 3.11 standard library only.

  resources/bench/snapshot.py [--runs 5]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BASE_CMDLINE, CACHE, EMBER, ROOT, BenchError, fmt, log, median_min_max)

SCRIPT = "echo READY; read line; echo GOT $line"


def wait_for(proc, needle, timeout):
    """Reads proc's stdout until `needle`; returns the seconds it took from now."""
    start = time.monotonic()
    seen = b""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, True)
    while needle not in seen:
        if time.monotonic() - start > timeout:
            raise BenchError(f"no {needle!r} after {timeout} s: {seen[-500:]!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise BenchError(f"the VM ended before {needle!r}: {seen[-500:]!r}")
        seen += chunk
    return time.monotonic() - start


def answer(proc, start):
    """Sends a line; returns spawn -> the echoed answer, in seconds."""
    proc.stdin.write(b"hello\n")
    proc.stdin.flush()
    wait_for(proc, b"GOT hello", 600)
    return time.monotonic() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ember", default=str(EMBER))
    p.add_argument("--markdown", default=str(ROOT / "target/bench/snapshot.md"))
    p.add_argument("--json", default=str(ROOT / "target/bench/snapshot.json"))
    args = p.parse_args()
    ember = Path(args.ember)
    if not os.access(ember, os.X_OK):
        raise BenchError(f"{ember} not found: build it with `cargo build --release`")
    kernel, initrd = CACHE / "default/vmlinux", CACHE / "default/initramfs.cpio"
    if not kernel.exists():
        raise BenchError("the default guest is not built: run resources/build-guest.sh")
    tmp = Path(tempfile.mkdtemp(prefix="ember-bench-snapshot-"))
    samples = {k: [] for k in ("cold_s", "warm_s", "pause_ms", "written_mib")}
    try:
        for i in range(args.runs):
            log(f"run {i + 1}/{args.runs}: cold boot, snapshot")
            socket, snap = tmp / "api.sock", tmp / f"snap{i}"
            start = time.monotonic()
            cold = subprocess.Popen(
                [str(ember), "run", "--kernel", str(kernel.resolve()), "--initrd",
                 str(initrd.resolve()), "--cmdline", f'{BASE_CMDLINE} ember.cmd="{SCRIPT}"',
                 "--api-socket", str(socket)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            samples["cold_s"].append(wait_for(cold, b"READY", 600))
            # Let the shell reach its read, then snapshot it there.
            time.sleep(1)
            taken = subprocess.run([str(ember), "ctl", str(socket), "snapshot", str(snap)],
                                   capture_output=True, text=True, check=True)
            reply = json.loads(taken.stdout)
            samples["pause_ms"].append(reply["pause_ms"])
            samples["written_mib"].append(reply["memory_bytes_written"] / (1 << 20))
            answer(cold, start)
            cold.wait(60)

            log(f"run {i + 1}/{args.runs}: restore")
            start = time.monotonic()
            warm = subprocess.Popen([str(ember), "run", "--restore", str(snap)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
            samples["warm_s"].append(answer(warm, start))
            warm.wait(60)
            shutil.rmtree(snap)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [("spawn → the shell ready, booted", "cold_s", "s"),
            ("spawn → the shell's answer, restored", "warm_s", "s"),
            ("snapshot pause", "pause_ms", "ms"),
            ("RAM written", "written_mib", "MiB")]
    lines = ["| metric | median (min–max) |", "|---|---|"]
    for name, key, unit in rows:
        m = median_min_max(samples[key])
        lines.append(f"| {name} | {fmt(m[0])} {unit} ({fmt(m[1])}–{fmt(m[2])}) |")
    cold, warm = median_min_max(samples["cold_s"])[0], median_min_max(samples["warm_s"])[0]
    lines.append(f"| cold / warm | {fmt(cold / warm)}× |")
    lines.append("")
    lines.append(f"{args.runs} runs, default guest (1 vCPU, 128 MiB), console mode.")
    table = "\n".join(lines)
    print(table)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(table + "\n")
    Path(args.json).write_text(json.dumps({"samples": samples}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(2)
