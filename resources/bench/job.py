#!/usr/bin/env python3
"""Job mode against the serial console, on the default Linux guest, in one run.

  first_line_s     spawn -> the first line of `ember run -- echo hi` on ember's stdout
                   (boot, agent ready, one command); for the console, spawn -> the first line of
                   `ember run --cmdline "... ember.cmd='echo hi'"` on stdout
  stdout_mib_s     stdout throughput of `head -c SIZE /dev/zero` in the guest, from the first byte
                   to the last read on the host: through the agent (vsock) and through the
                   console (ttyS0, one port-I/O exit per byte), with --console-size bytes since
                   the console is slow
  agent_ready_s    ember's start -> the agent's boot-timer mark (0x61, once it listens), which
                   `ember -v` logs
  sizes            ember-agent and the default initramfs, in bytes

Runs are interleaved (agent, console, agent, ...). Prints a Markdown table and writes it to
--markdown, with the raw samples in --json. Python 3.11 standard library only.

  resources/bench/job.py [--runs 3] [--size 8M] [--console-size 256K]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchlib import CACHE, ROOT, BenchError, fmt, log, median_min_max

EMBER = ROOT / "target/x86_64-unknown-linux-gnu/release/ember"
AGENT = ROOT / "target/x86_64-unknown-linux-gnu/release/ember-agent"


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def guest():
    default = CACHE / "default"
    kernel, initrd = default / "vmlinux", default / "initramfs.cpio"
    if not kernel.exists() or not initrd.exists():
        raise BenchError("the default guest is not built: run resources/build-guest.sh")
    return kernel.resolve(), initrd.resolve()


def timed_run(argv, expect_bytes=None, timeout=900):
    """Runs argv; returns (seconds to the first stdout line, seconds from the first stdout byte to
    the last, stdout bytes, stderr text, exit code)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_line = first_byte = last_byte = None
    total = 0
    seen_newline = False
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 1 << 16)
        now = time.monotonic()
        if not chunk:
            break
        if first_byte is None:
            first_byte = now
        last_byte = now
        total += len(chunk)
        if not seen_newline and b"\n" in chunk:
            seen_newline = True
            first_line = now - start
        if now - start > timeout:
            proc.kill()
            raise BenchError(f"{argv[:3]} ran past {timeout} s")
    stderr = proc.stderr.read().decode(errors="replace")
    code = proc.wait()
    if expect_bytes is not None and total < expect_bytes:
        raise BenchError(f"got {total} bytes of {expect_bytes}: {stderr[-2000:]}")
    span = (last_byte - first_byte) if first_byte is not None else None
    return first_line, span, total, stderr, code, start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", default="8M", help="agent stdout bytes (8M)")
    p.add_argument("--console-size", default="256K", help="console stdout bytes (256K)")
    p.add_argument("--ember", default=str(EMBER))
    p.add_argument("--markdown", default=str(ROOT / "target/bench/job.md"))
    p.add_argument("--json", default=str(ROOT / "target/bench/job.json"))
    args = p.parse_args()
    ember = Path(args.ember)
    if not os.access(ember, os.X_OK):
        raise BenchError(f"{ember} not found: build it with `cargo build --release`")
    kernel, initrd = guest()
    base = [str(ember), "run", "--kernel", str(kernel), "--initrd", str(initrd)]
    cmdline = "console=ttyS0 reboot=k panic=-1 quiet tsc=reliable"
    size, console_size = parse_size(args.size), parse_size(args.console_size)
    samples = {k: [] for k in ("agent_first_line_s", "console_first_line_s", "agent_ready_s",
                                "agent_mib_s", "console_mib_s")}
    for i in range(args.runs):
        log(f"run {i + 1}/{args.runs}: agent")
        first, _, _, err, code, start = timed_run(
            base + ["-v", "--cmdline", cmdline, "--", "echo", "hi"])
        if code != 0:
            raise BenchError(f"ember run -- echo hi exited {code}: {err[-2000:]}")
        samples["agent_first_line_s"].append(first)
        ready = agent_ready_seconds(err)
        if ready is not None:
            samples["agent_ready_s"].append(ready)
        _, span, total, err, code, _ = timed_run(
            base + ["--cmdline", cmdline, "--", "head", "-c", str(size), "/dev/zero"], size)
        samples["agent_mib_s"].append(total / span / (1 << 20))
        log(f"run {i + 1}/{args.runs}: console")
        first, _, _, err, code, _ = timed_run(
            base + ["--cmdline", f"{cmdline} ember.cmd=\"echo hi\""])
        samples["console_first_line_s"].append(first)
        # The console's bytes follow the boot messages; count the span of the payload only:
        # from the first byte to the last of the run, minus nothing (quiet boot prints little).
        _, span, total, err, code, _ = timed_run(
            base + ["--cmdline",
                    f"{cmdline} ember.cmd=\"head -c {console_size} /dev/zero\""], console_size)
        samples["console_mib_s"].append(total / span / (1 << 20))
    sizes = {"ember-agent": AGENT.stat().st_size if AGENT.exists() else None,
             "initramfs": initrd.stat().st_size}
    rows = [
        ("spawn → first line of `echo hi`", "agent_first_line_s", "console_first_line_s", "s"),
        ("stdout throughput", "agent_mib_s", "console_mib_s", "MiB/s"),
    ]
    lines = ["| metric | agent (vsock) | console (ttyS0) | agent/console |", "|---|---|---|---|"]
    for name, a, c, unit in rows:
        ma, mc = median_min_max(samples[a]), median_min_max(samples[c])
        lines.append(f"| {name} | {fmt(ma[0])} {unit} ({fmt(ma[1])}–{fmt(ma[2])}) | "
                     f"{fmt(mc[0])} {unit} ({fmt(mc[1])}–{fmt(mc[2])}) | {fmt(ma[0] / mc[0])} |")
    if samples["agent_ready_s"]:
        mr = median_min_max(samples["agent_ready_s"])
        lines.append(f"| spawn → agent ready | {fmt(mr[0])} s ({fmt(mr[1])}–{fmt(mr[2])}) | | |")
    lines.append("")
    lines.append(f"Sizes: ember-agent {sizes['ember-agent']} bytes, initramfs {sizes['initramfs']} "
                 f"bytes; agent stdout {size} bytes, console stdout {console_size} bytes; "
                 f"{args.runs} runs each.")
    table = "\n".join(lines)
    print(table)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(table + "\n")
    Path(args.json).write_text(json.dumps({"samples": samples, "sizes": sizes}, indent=2))
    return 0


def agent_ready_seconds(stderr):
    """The agent's boot-timer mark (0x61, written once it listens), which `ember -v` logs in ms
    since ember started."""
    m = re.search(r"boot timer: guest wrote 0x61 at ([0-9.]+) ms", stderr)
    return float(m.group(1)) / 1000 if m else None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(2)
