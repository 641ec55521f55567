#!/usr/bin/env python3
"""Snapshots and warm starts of the default Linux guest, in one run.

Console mode (a shell on the serial console, snapshot through the control socket):

  cold_s        spawn -> a booted guest's shell printing READY on the serial console, ready to
                read a line (the snapshot is taken after that, outside the measurement)
  warm_s        spawn of `ember run --restore` of a snapshot taken while that shell waited ->
                its answer to a line sent at once (so a round trip more than cold_s)
  pause_ms      how long the snapshot paused the VM (ember's answer to PUT /vm/snapshot)
  written_mib   guest RAM written to the memory file (sparse: touched pages only)

QEMU (microvm, same kernel, initramfs and command line), where it can do the same: the shell
booted (qemu_cold_s), migrated to a file with the monitor's `migrate "exec:cat > FILE"`
(qemu_pause_ms: the migration's total time; qemu_state_mib: the file), and resumed in a new
QEMU with `-incoming "exec:cat FILE"` (qemu_warm_s: spawn -> the answer to a line sent at once).

Job mode (`ember run -- true`, the warm-start cache in a private XDG_CACHE_HOME):

  job_cold_s    spawn -> exit of `ember run --cold -- true` (boot, agent, command)
  job_warm_s    spawn -> exit of `ember run -- true` resuming the cached snapshot
  warm_*_ms     a warm run taken apart from `ember -v`'s log: spawn -> "resuming" (ember's own
                start), -> the agent announcing itself (restore, the guest taking the vsock
                reset), -> "the command runs" (connection, refresh, the guest's fork+exec),
                -> "the command exited", -> ember's exit (teardown)
  save_pause_ms the first run's pause to save the snapshot, and its size (save_mib)
  concurrent_s  --concurrent warm runs of `true` spawned at once -> the last one exited
  pss_mib       proportional set size of each of --concurrent warm VMs running `sleep` at
                once (guest RAM included: the snapshot's pages are shared between them), and
                rss_mib, the same without sharing taken into account

Runs are interleaved (cold, warm, cold, ...). Prints a Markdown table and writes it to
--markdown, with the raw samples in --json. Needs /dev/kvm and the default guest
(resources/build-guest.sh). Python 3.11 standard library only.

  resources/bench/snapshot.py [--runs 5] [--job-runs 5] [--concurrent 10]
"""

import argparse
import datetime
import json
import os
import re
import shutil
import socket as unix_socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BASE_CMDLINE, CACHE, EMBER, IS_PVM, PVM_CMDLINE, QEMU_CPU, QEMU_CPU_PVM,
                      QEMU_MACHINE, ROOT, BenchError, find_qemu, fmt, log, median_min_max)

SCRIPT = "echo READY; read line; echo GOT $line"
LOG_RE = re.compile(r"^\[(\S+Z) +INFO +\S+\] (.*)$")
# (sample key, the -v log line that ends the phase)
WARM_PHASES = [("warm_start_ms", "warm start: resuming"),
               ("warm_agent_ms", "job: the guest agent is ready"),
               ("warm_command_ms", "job: the command runs in the guest"),
               ("warm_exit_ms", "the command exited")]


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
    """Sends a line; returns spawn -> the echoed answer, in seconds. (A QEMU resumed from a
    migration file loses the first byte sent before its guest runs: the answer is `GOT ello`.)"""
    proc.stdin.write(b"hello\n")
    proc.stdin.flush()
    wait_for(proc, b"GOT ", 600)
    return time.monotonic() - start


def qemu_argv(qemu, kernel, initrd, monitor, extra=()):
    cmdline = f'{BASE_CMDLINE} {PVM_CMDLINE if IS_PVM else ""} ember.cmd="{SCRIPT}"'
    return [qemu, "-M", QEMU_MACHINE, "-enable-kvm", "-cpu", QEMU_CPU_PVM if IS_PVM else QEMU_CPU,
            "-smp", "1", "-m", "128M", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-monitor", f"unix:{monitor},server=on,wait=off", "-no-reboot",
            "-device", "i8042", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
            "-kernel", str(kernel.resolve()), "-initrd", str(initrd.resolve()),
            "-append", cmdline, *extra]


def hmp(monitor, command, settle=0.2):
    """One human-monitor command on a connected socket; returns what came back meanwhile."""
    monitor.sendall(command.encode() + b"\n")
    time.sleep(settle)
    monitor.settimeout(5)
    try:
        return monitor.recv(1 << 16).decode(errors="replace")
    except TimeoutError:
        return ""


def qemu_round(qemu, kernel, initrd, tmp, samples):
    """QEMU: boot the shell, migrate it to a file, resume the file in a new QEMU."""
    monitor_path, state = tmp / "qemu.mon", tmp / "qemu.state"
    start = time.monotonic()
    cold = subprocess.Popen(qemu_argv(qemu, kernel, initrd, monitor_path), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        samples["qemu_cold_s"].append(wait_for(cold, b"READY", 600))
        time.sleep(1)
        monitor = unix_socket.socket(unix_socket.AF_UNIX)
        monitor.connect(str(monitor_path))
        hmp(monitor, "")
        hmp(monitor, f'migrate "exec:cat > {state}"')
        deadline = time.monotonic() + 300
        while True:
            status = hmp(monitor, "info migrate", settle=0.5)
            if "Migration status: completed" in status:
                break
            if "failed" in status or time.monotonic() > deadline:
                raise BenchError(f"QEMU's migration did not complete: {status[-500:]}")
        took = [line for line in status.splitlines() if line.startswith("total time:")]
        samples["qemu_pause_ms"].append(float(took[0].split()[2]))
        samples["qemu_state_mib"].append(state.stat().st_size / (1 << 20))
        hmp(monitor, "quit")
        monitor.close()
        cold.wait(60)
    finally:
        if cold.poll() is None:
            cold.kill()
    start = time.monotonic()
    warm = subprocess.Popen(qemu_argv(qemu, kernel, initrd, monitor_path,
                                      ("-incoming", f"exec:cat {state}")),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        samples["qemu_warm_s"].append(answer(warm, start))
        warm.wait(60)
    finally:
        if warm.poll() is None:
            warm.kill()
    state.unlink()


class Jobs:
    """`ember -v run -- CMD` on the default guest, with a warm-start cache of its own."""

    def __init__(self, ember, kernel, initrd, cache):
        self.base = [str(ember), "-v", "run", "--kernel", str(kernel.resolve()), "--initrd",
                     str(initrd.resolve())]
        self.env = dict(os.environ, XDG_CACHE_HOME=str(cache))

    def spawn(self, argv, extra=(), stderr=subprocess.PIPE):
        return subprocess.Popen(self.base + list(extra) + ["--"] + argv, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, text=True)

    def run(self, argv, extra=()):
        """Runs a job; returns (spawn -> exit in seconds, spawn wall-clock time, ember's log)."""
        wall, start = time.time(), time.monotonic()
        p = self.spawn(argv, extra)
        _, err = p.communicate(timeout=600)
        elapsed = time.monotonic() - start
        if p.returncode != 0:
            raise BenchError(f"{argv} exited {p.returncode}: {err[-2000:]}")
        return elapsed, wall, err


def phases(wall, elapsed, log_text):
    """A warm run's phases in ms, from its log's wall-clock timestamps."""
    stamps = {}
    for line in log_text.splitlines():
        m = LOG_RE.match(line)
        if not m:
            continue
        at = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        for key, text in WARM_PHASES:
            if m.group(2).startswith(text) and key not in stamps:
                stamps[key] = at
    missing = [key for key, _ in WARM_PHASES if key not in stamps]
    if missing:
        raise BenchError(f"no {missing} in a warm run's log: {log_text[-2000:]}")
    out, last = {}, wall
    for key, _ in WARM_PHASES:
        out[key] = (stamps[key] - last) * 1e3
        last = stamps[key]
    out["warm_teardown_ms"] = (wall + elapsed - last) * 1e3
    return out


def memory_of(pid):
    """(Pss, Rss) of a process in MiB, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields["Pss"] / 1024, fields["Rss"] / 1024


def job_mode(args, ember, kernel, initrd, tmp, samples):
    jobs = Jobs(ember, kernel, initrd, tmp / "cache")
    log("job mode: the first run boots and saves the snapshot")
    _, _, err = jobs.run(["true"])
    m = re.search(r"the VM paused ([\d.]+)(ms|s|µs), (\d+) bytes of RAM written", err)
    if not m:
        raise BenchError(f"the first run saved no snapshot: {err[-2000:]}")
    scale = {"s": 1e3, "ms": 1, "µs": 1e-3}[m.group(2)]
    samples["save_pause_ms"].append(float(m.group(1)) * scale)
    samples["save_mib"].append(int(m.group(3)) / (1 << 20))
    for i in range(args.job_runs):
        log(f"job run {i + 1}/{args.job_runs}: cold, warm")
        elapsed, _, _ = jobs.run(["true"], ["--cold"])
        samples["job_cold_s"].append(elapsed)
        elapsed, wall, err = jobs.run(["true"])
        if "warm start: resuming" not in err:
            raise BenchError(f"a run that should be warm was not: {err[-2000:]}")
        samples["job_warm_s"].append(elapsed)
        for key, value in phases(wall, elapsed, err).items():
            samples[key].append(value)
    log(f"job mode: {args.concurrent} warm runs at once")
    start = time.monotonic()
    procs = [jobs.spawn(["true"], stderr=subprocess.DEVNULL) for _ in range(args.concurrent)]
    for p in procs:
        if p.wait(600) != 0:
            raise BenchError(f"a concurrent warm run exited {p.returncode}")
    samples["concurrent_s"].append(time.monotonic() - start)
    log(f"job mode: memory of {args.concurrent} warm VMs at once")
    logs = [tmp / f"sleep{n}.log" for n in range(args.concurrent)]
    procs = []
    for path in logs:
        with open(path, "w") as f:
            procs.append(jobs.spawn(["sleep", "600"], stderr=f))
    try:
        deadline = time.monotonic() + 600
        while not all("the command runs in the guest" in p.read_text() for p in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise BenchError("the warm VMs did not all start their command")
            time.sleep(0.2)
        for p in procs:
            pss, rss = memory_of(p.pid)
            samples["pss_mib"].append(pss)
            samples["rss_mib"].append(rss)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="console-mode cold/restore pairs (5)")
    p.add_argument("--job-runs", type=int, default=5, help="job-mode cold/warm pairs (5)")
    p.add_argument("--concurrent", type=int, default=10, help="warm VMs at once (10)")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    p.add_argument("--no-install", action="store_true",
                   help="do not install QEMU when it is missing")
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
    qemu = None if args.no_qemu else find_qemu(args.qemu, args.no_install)
    samples = {k: [] for k in ("cold_s", "warm_s", "pause_ms", "written_mib", "job_cold_s",
                               "job_warm_s", "save_pause_ms", "save_mib", "concurrent_s",
                               "pss_mib", "rss_mib", "warm_teardown_ms", "qemu_cold_s",
                               "qemu_warm_s", "qemu_pause_ms", "qemu_state_mib")}
    for key, _ in WARM_PHASES:
        samples[key] = []
    try:
        job_mode(args, ember, kernel, initrd, tmp, samples)
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
            if qemu:
                log(f"run {i + 1}/{args.runs}: QEMU boot, migration to a file, resume")
                qemu_round(qemu, kernel, initrd, tmp, samples)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [("console: spawn → the shell ready, booted", "cold_s", "s"),
            ("console: spawn → the shell's answer, restored", "warm_s", "s"),
            ("console: snapshot pause", "pause_ms", "ms"),
            ("console: RAM written", "written_mib", "MiB"),
            ("QEMU: spawn → the shell ready, booted", "qemu_cold_s", "s"),
            ("QEMU: spawn → the shell's answer, resumed from a migration file",
             "qemu_warm_s", "s"),
            ("QEMU: migration to the file (total time)", "qemu_pause_ms", "ms"),
            ("QEMU: the migration file", "qemu_state_mib", "MiB"),
            ("job: `ember run --cold -- true`, spawn → exit", "job_cold_s", "s"),
            ("job: `ember run -- true` warm, spawn → exit", "job_warm_s", "s"),
            ("… ember's start → resuming", "warm_start_ms", "ms"),
            ("… resuming → the agent announces itself", "warm_agent_ms", "ms"),
            ("… → the command runs (the guest's fork+exec)", "warm_command_ms", "ms"),
            ("… → the command exited", "warm_exit_ms", "ms"),
            ("… → ember's exit", "warm_teardown_ms", "ms"),
            ("job: the first run's pause to save", "save_pause_ms", "ms"),
            ("job: the snapshot's RAM", "save_mib", "MiB"),
            (f"job: {args.concurrent} warm `true` at once, all exited", "concurrent_s", "s"),
            (f"job: PSS of each of {args.concurrent} warm VMs", "pss_mib", "MiB"),
            (f"job: RSS of each of {args.concurrent} warm VMs", "rss_mib", "MiB")]
    lines = ["| metric | median (min–max) |", "|---|---|"]
    for name, key, unit in rows:
        if not samples[key]:
            continue
        m = median_min_max(samples[key])
        lines.append(f"| {name} | {fmt(m[0])} {unit} ({fmt(m[1])}–{fmt(m[2])}) |")
    for name, cold_key, warm_key in (("console: booted / restored", "cold_s", "warm_s"),
                                     ("job: cold / warm", "job_cold_s", "job_warm_s")):
        cold = median_min_max(samples[cold_key])[0]
        warm = median_min_max(samples[warm_key])[0]
        lines.append(f"| {name} | {fmt(cold / warm)}× |")
    if samples["qemu_warm_s"]:
        ember_warm = median_min_max(samples["warm_s"])[0]
        qemu_warm = median_min_max(samples["qemu_warm_s"])[0]
        lines.append(f"| console: resumed, Ember / QEMU | {fmt(ember_warm / qemu_warm)} |")
    lines.append("")
    lines.append(f"{args.runs} console and {args.job_runs} job runs, default guest (1 vCPU, "
                 "128 MiB).")
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
