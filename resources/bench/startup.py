#!/usr/bin/env python3
"""Ember vs QEMU microvm: how fast a VM starts and ends, and how much the monitor weighs.

The guests are the start-up guests of resources/guests/bench/startup.S (built by `make -C
resources/guests`): ~5 KiB PVH kernels that stay in 32-bit protected mode, print one line on
COM1 ("ember-startup: guest up") and reset through the i8042 (startup.elf), or first make 20000
port-I/O exits (pio-loop.elf), or halt forever after the line (startup-hold.elf). Each
monitor boots the same ELF with 128 MiB of RAM and one vCPU; QEMU is given the i8042 and
-no-reboot, so that the reset ends it as it ends Ember. Runs are interleaved (Ember, QEMU,
Ember, QEMU, ...) after --warmup unrecorded runs of each, and every value is reported as
min/median/max with the Ember/QEMU ratio of the medians:

  first_line_ms   spawn -> the guest's line read from the monitor's stdout (a pipe)
  exit_ms         spawn -> the monitor's exit seen by waitpid, after the guest's reset
  rss_mib         resident memory of the monitor, not counting guest RAM: the Rss of every
                  mapping in /proc/PID/smaps but the guest RAM mapping (the one of exactly the
                  guest's RAM size), read while startup-hold.elf idles after its line
  concurrent_ms   --concurrent VMs spawned at once -> the last of them exited
  pio_exit_us     the cost of one port-I/O exit to the monitor (an OUT to COM1's scratch
                  register, which both handle in user space): (exit_ms of pio-loop.elf - median
                  exit_ms of startup.elf) / 20000. It includes the two loop instructions around
                  the OUT, emulated on software KVM; that part is the same for every monitor.
  linux_init_s    spawn -> "EMBER-INIT" on the console of the default Linux guest (kernel +
                  uncompressed initramfs of resources/build-guest.sh), --linux-runs times;
                  for Ember also the boot-timer mark /init writes (port 0x80, logged by `ember -v`)

Two yardsticks are measured the same way: spawn -> exit of /bin/true (what spawning costs at
all), and "bare KVM": resources/bench/pio-floor.c (built with gcc), the least a monitor can do
(one memory slot, one vCPU, no irqchip, no threads, each exit straight back into KVM_RUN) booting
the same guests. Its pio_exit_us is the floor the kernel sets, reported with the Ember/bare ratio.

Prints a Markdown table, writes it to --markdown and the raw samples and machine facts to
--json. Needs /dev/kvm and gcc; installs qemu-system-x86 with apt-get when it is missing and we are
root. Python 3.11 standard library only.

  resources/bench/startup.py [--runs 30] [--no-linux]
"""

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BASE_CMDLINE, CACHE, IS_PVM, MONITORS, PVM_CMDLINE, QEMU_CPU,
                      QEMU_CPU_PVM, QEMU_MACHINE, ROOT, BenchError, add_common_arguments,
                      check_kvm, find_ember, find_qemu, fmt, log, machine_facts, median_min_max,
                      run_bench)

GUEST_LINE = b"ember-startup: guest up\n"
PIO_COUNT = 20000  # the pio-loop.elf build's -DPIO_COUNT (resources/guests/Makefile)
MEMORY_MIB = 128
BARE = "bare"  # the bare-KVM yardstick, resources/bench/pio-floor.c
BARE_METRICS = ("first_line_ms", "exit_ms", "pio_exit_us")
BOOT_TIMER_RE = re.compile(rb"boot timer: guest wrote 0x60 at ([\d.]+) ms")

# (key, label, unit)
METRICS = [
    ("first_line_ms", "spawn → first guest line on stdout", "ms"),
    ("exit_ms", "spawn → process exit (guest resets)", "ms"),
    ("rss_mib", "RSS not counting guest RAM", "MiB"),
    ("concurrent_ms", "{n} VMs started at once, all exited", "ms"),
    ("pio_exit_us", "one port-I/O exit to the monitor", "µs"),
    ("linux_init_s", "Linux guest: spawn → /init (console)", "s"),
    ("linux_boot_timer_s", "Linux guest: spawn → /init (boot timer, Ember only)", "s"),
]


class Proc:
    """A monitor started with posix_spawn (the cheapest spawn Python has, the same for both),
    its stdout on a pipe and its stderr in a file."""

    def __init__(self, argv, stderr_file):
        read_end, write_end = os.pipe()
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, write_end, 1),
                   (os.POSIX_SPAWN_DUP2, stderr_file.fileno(), 2),
                   (os.POSIX_SPAWN_CLOSE, read_end)]
        self.t0 = time.perf_counter()
        self.pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions,
                                  setsid=True)
        os.close(write_end)
        self.out = read_end
        self.output = b""
        self.status = None

    def read_until(self, needle, deadline):
        """Reads stdout until `needle` appears; returns the time it did, or None at EOF."""
        while needle not in self.output:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"timed out waiting for {needle!r}; got {self.output[-200:]!r}")
            ready, _, _ = select.select([self.out], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.out, 65536)
            if not chunk:
                return None
            self.output += chunk
        return time.perf_counter()

    def wait(self, deadline):
        """Drains stdout and waits for the exit; returns the time waitpid saw it."""
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"pid {self.pid} did not exit in time")
            ready, _, _ = select.select([self.out], [], [], left)
            if ready and not self.drain():
                break
        pid, status = os.waitpid(self.pid, 0)
        t = time.perf_counter()
        self.status = os.waitstatus_to_exitcode(status)
        return t

    def drain(self):
        chunk = os.read(self.out, 65536)
        self.output += chunk
        return bool(chunk)

    def kill(self):
        if self.status is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.status = -9
        os.close(self.out)
        self.out = None


def rss_without_guest_ram_kib(pid, memory_kib):
    """Sum of Rss over the mappings of /proc/PID/smaps but the guest RAM mapping."""
    total, ram_found, size = 0, False, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
            if size == memory_kib and not ram_found:
                ram_found = True
            else:
                total += rss
    if not ram_found:
        raise BenchError(f"no mapping of {memory_kib} KiB (the guest RAM) in /proc/{pid}/smaps")
    return total


class StartupBench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="ember-startup-"))
        self.live = []
        self.samples = {m: {k: [] for k, _, _ in METRICS} for m in MONITORS}
        self.samples[BARE] = {k: [] for k in BARE_METRICS}
        self.samples["true"] = {"exit_ms": []}
        self.errors = []

    # -- setup -------------------------------------------------------------------------------

    def preflight(self):
        a = self.args
        check_kvm()
        self.ember = find_ember(a.ember)
        self.qemu = find_qemu(a.qemu, a.no_install)
        r = subprocess.run(["make", "-s", "-C", str(ROOT / "resources/guests")], text=True,
                           capture_output=True)
        if r.returncode:
            raise BenchError("building the micro-guests failed:\n" + r.stderr[-2000:])
        self.bare = ROOT / "target/bench/pio-floor"
        self.bare.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(self.bare),
                            str(ROOT / "resources/bench/pio-floor.c")], text=True,
                           capture_output=True)
        if r.returncode:
            raise BenchError("building resources/bench/pio-floor.c failed:\n" + r.stderr[-2000:])
        guests = ROOT / "target/guests"
        self.guests = {g: guests / f"{g}.elf" for g in ("startup", "startup-hold", "pio-loop")}
        if a.linux_runs:
            r = subprocess.run([str(ROOT / "resources/build-guest.sh")], text=True,
                               capture_output=True)
            if r.returncode:
                raise BenchError("resources/build-guest.sh failed:\n" + r.stderr[-2000:])
            self.kernel = (CACHE / "default/vmlinux").resolve()
            self.initrd = (CACHE / "default/initramfs.cpio").resolve()

    def argv(self, monitor, kernel, linux=False):
        memory = f"{MEMORY_MIB}M"
        if monitor == BARE:
            return [str(self.bare), str(kernel)]
        if monitor == "ember":
            argv = [str(self.ember)]
            if linux:
                argv.append("-v")  # logs the boot-timer marks
            argv += ["run", "--kernel", str(kernel), "--memory", memory]
            if linux:
                argv += ["--initrd", str(self.initrd), "--cmdline",
                         f"{BASE_CMDLINE} ember.cmd=true"]
            return argv
        argv = [self.qemu, "-M", QEMU_MACHINE, "-enable-kvm",
                "-cpu", QEMU_CPU_PVM if IS_PVM else QEMU_CPU, "-smp", "1", "-m", memory,
                "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                "-monitor", "none", "-no-reboot", "-device", "i8042", "-kernel", str(kernel)]
        if linux:
            cmdline = f"{BASE_CMDLINE} ember.cmd=true"
            if IS_PVM:
                cmdline += " " + PVM_CMDLINE
            argv += ["-initrd", str(self.initrd), "-append", cmdline,
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
        return argv

    def spawn(self, argv):
        stderr_file = tempfile.TemporaryFile(dir=self.tmp)
        p = Proc(argv, stderr_file)
        p.stderr_file = stderr_file
        self.live.append(p)
        return p

    def finish(self, p):
        p.kill()
        self.live.remove(p)
        p.stderr_file.seek(0)
        stderr = p.stderr_file.read()
        p.stderr_file.close()
        return stderr

    def check(self, monitor, what, p, stderr, want_status=0):
        if p.status != want_status or GUEST_LINE.strip() not in p.output:
            self.errors.append(f"{monitor} {what}: exit status {p.status} (wanted "
                               f"{want_status}), stdout {p.output[-200:]!r}, "
                               f"stderr {stderr[-300:]!r}")
            return False
        return True

    # -- measurements ------------------------------------------------------------------------

    def one_boot(self, monitor, guest, record):
        """spawn -> first line, spawn -> exit of one VM."""
        deadline = time.perf_counter() + self.args.timeout
        p = self.spawn(self.argv(monitor, self.guests[guest]))
        try:
            t_line = p.read_until(GUEST_LINE, deadline)
            t_exit = p.wait(deadline)
        finally:
            stderr = self.finish(p)
        if record and self.check(monitor, guest, p, stderr) and t_line is not None:
            return (t_line - p.t0) * 1e3, (t_exit - p.t0) * 1e3
        return None

    def spawn_true(self):
        p = self.spawn(["/bin/true"])
        try:
            t_exit = p.wait(time.perf_counter() + 10)
        finally:
            self.finish(p)
        self.samples["true"]["exit_ms"].append((t_exit - p.t0) * 1e3)

    def rss(self, monitor):
        deadline = time.perf_counter() + self.args.timeout
        p = self.spawn(self.argv(monitor, self.guests["startup-hold"]))
        try:
            if p.read_until(GUEST_LINE, deadline) is None:
                raise BenchError(f"{monitor}: startup-hold.elf ended before its line")
            time.sleep(0.2)  # let the monitor finish whatever it does after the first output
            kib = rss_without_guest_ram_kib(p.pid, MEMORY_MIB * 1024)
        finally:
            self.finish(p)
        return kib / 1024

    def concurrent(self, monitor):
        n = self.args.concurrent
        deadline = time.perf_counter() + self.args.timeout
        t0 = time.perf_counter()
        procs = [self.spawn(self.argv(monitor, self.guests["startup"])) for _ in range(n)]
        ok = True
        try:
            for p in procs:
                p.wait(deadline)
            t_end = time.perf_counter()
        finally:
            for p in procs:
                ok &= self.check(monitor, f"concurrent x{n}", p, self.finish(p))
        return (t_end - t0) * 1e3 if ok else None

    def linux(self, monitor):
        deadline = time.perf_counter() + self.args.linux_timeout
        p = self.spawn(self.argv(monitor, self.kernel, linux=True))
        try:
            t_init = p.read_until(b"EMBER-INIT", deadline)
            p.wait(deadline)
        finally:
            stderr = self.finish(p)
        # Ember exits with the guest's status; QEMU's isa-debug-exit with (status << 1) | 1.
        want = 0 if monitor == "ember" else 1
        if t_init is None or p.status != want:
            self.errors.append(f"{monitor} linux: exit status {p.status}, no EMBER-INIT or "
                               f"not status 0; stderr {stderr[-300:]!r}")
            return None, None
        mark = BOOT_TIMER_RE.search(stderr)
        if monitor == "ember" and not mark:
            self.errors.append("ember linux: no boot-timer mark 0x60 in ember's log")
        return t_init - p.t0, float(mark.group(1)) / 1e3 if mark else None

    # -- the whole benchmark -----------------------------------------------------------------

    def add(self, monitor, key, value):
        if value is not None:
            self.samples[monitor][key].append(value)

    def run(self):
        a = self.args
        self.preflight()
        facts = machine_facts(self.ember, self.qemu)
        log(f"{facts['kvm']}, {facts['cpu']}, {facts['qemu']}, {facts['ember']}")
        log(f"warm-up: {a.warmup} boot(s) per monitor")
        for _ in range(a.warmup):
            for monitor in MONITORS:
                self.one_boot(monitor, "startup", record=False)
        log(f"start-up: {a.runs} boot(s) per monitor, interleaved")
        for _ in range(a.runs):
            for monitor in (*MONITORS, BARE):
                r = self.one_boot(monitor, "startup", record=True)
                if r:
                    self.add(monitor, "first_line_ms", r[0])
                    self.add(monitor, "exit_ms", r[1])
            self.spawn_true()
        log(f"memory, {a.concurrent} concurrent VMs, port I/O: {a.other_runs} run(s) each")
        pio_exit_ms = {m: [] for m in (*MONITORS, BARE)}
        for _ in range(a.other_runs):
            for monitor in MONITORS:
                self.add(monitor, "rss_mib", self.rss(monitor))
                self.add(monitor, "concurrent_ms", self.concurrent(monitor))
            for monitor in (*MONITORS, BARE):
                r = self.one_boot(monitor, "pio-loop", record=True)
                if r:
                    pio_exit_ms[monitor].append(r[1])
        for monitor in (*MONITORS, BARE):
            base = self.samples[monitor]["exit_ms"]
            if base:
                base_median = median_min_max(base)[0]
                for t in pio_exit_ms[monitor]:
                    self.add(monitor, "pio_exit_us", (t - base_median) * 1e3 / PIO_COUNT)
        for i in range(a.linux_runs):
            for monitor in MONITORS:
                log(f"Linux boot {i + 1}/{a.linux_runs}: {monitor}")
                init_s, mark_s = self.linux(monitor)
                self.add(monitor, "linux_init_s", init_s)
                self.add(monitor, "linux_boot_timer_s", mark_s)
        facts["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        summary = self.summarize()
        doc = {"machine": facts, "config": self.config(), "summary": summary,
               "samples": self.samples, "errors": self.errors}
        md = self.markdown(facts, summary)
        print(md)
        for path, text in ((a.markdown, md), (a.json, json.dumps(doc, indent=2) + "\n")):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        log(f"wrote {a.markdown} and {a.json}")
        return 1 if self.errors else 0

    def config(self):
        a = self.args
        return {"runs": a.runs, "warmup": a.warmup, "other_runs": a.other_runs,
                "concurrent": a.concurrent, "linux_runs": a.linux_runs,
                "memory_mib": MEMORY_MIB, "pio_count": PIO_COUNT,
                "ember_argv": self.argv("ember", self.guests["startup"]),
                "qemu_argv": self.argv("qemu", self.guests["startup"]),
                "bare_argv": self.argv(BARE, self.guests["startup"])}

    def summarize(self):
        out = {}
        for key, label, unit in METRICS:
            row = {"label": label.format(n=self.args.concurrent), "unit": unit}
            for monitor in MONITORS:
                vals = self.samples[monitor][key]
                if vals:
                    med, lo, hi = median_min_max(vals)
                    row[monitor] = {"median": med, "min": lo, "max": hi, "n": len(vals)}
            if "ember" in row and "qemu" in row and row["qemu"]["median"]:
                row["ratio_ember_qemu"] = row["ember"]["median"] / row["qemu"]["median"]
            bare = self.samples[BARE].get(key)
            if bare:
                med, lo, hi = median_min_max(bare)
                row[BARE] = {"median": med, "min": lo, "max": hi, "n": len(bare)}
                if "ember" in row and med:
                    row["ratio_ember_bare"] = row["ember"]["median"] / med
            if "ember" in row or "qemu" in row:
                out[key] = row
        true_ms = self.samples["true"]["exit_ms"]
        if true_ms:
            med, lo, hi = median_min_max(true_ms)
            out["spawn_true_ms"] = {"label": "yardstick: spawn → exit of /bin/true",
                                    "unit": "ms", "true": {"median": med, "min": lo, "max": hi,
                                                           "n": len(true_ms)}}
        return out

    def markdown(self, facts, summary):
        a = self.args
        lines = [
            f"Start-up: Ember vs QEMU microvm; {a.runs} interleaved boots each for the first two "
            f"rows, {a.other_runs} for the next three, {a.linux_runs} Linux boots; "
            f"{facts['kvm']}, {facts['cpu']} ({facts['host_cpus']} host CPUs), "
            f"{facts['qemu']}, {facts['ember']}; 1 vCPU, {MEMORY_MIB} MiB; {facts['date']}.",
            "",
            "| metric | unit | Ember median (min–max) | QEMU median (min–max) | Ember/QEMU "
            "| bare KVM median (min–max) | Ember/bare |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, row in summary.items():
            if key == "spawn_true_ms":
                s = row["true"]
                lines.append(f"| {row['label']} | ms | {fmt(s['median'])} "
                             f"({fmt(s['min'])}–{fmt(s['max'])}) | | | | |")
                continue
            cells = [f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"
                     if (s := row.get(m)) else "–" for m in (*MONITORS, BARE)]
            ratios = [f"{r:.2f}" if (r := row.get(k)) else "–"
                      for k in ("ratio_ember_qemu", "ratio_ember_bare")]
            lines.append(f"| {row['label']} | {row['unit']} | {cells[0]} | {cells[1]} | "
                         f"{ratios[0]} | {cells[2]} | {ratios[1]} |")
        if self.errors:
            lines += ["", "Errors:", *[f"- {e}" for e in self.errors]]
        return "\n".join(lines) + "\n"

    def cleanup(self):
        for p in list(self.live):
            self.finish(p)
        for f in self.tmp.iterdir():
            f.unlink()
        self.tmp.rmdir()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring (--help-long) for details.")
    p.add_argument("--runs", type=int, default=30,
                   help="start-up boots per monitor (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded boots first (3)")
    p.add_argument("--other-runs", type=int, default=10,
                   help="runs of the memory, concurrency and port-I/O measurements (10)")
    p.add_argument("--concurrent", type=int, default=10, help="VMs started at once (10)")
    p.add_argument("--linux-runs", type=int, default=3, help="Linux boots per monitor (3)")
    p.add_argument("--no-linux", dest="linux_runs", action="store_const", const=0,
                   help="skip the Linux boots")
    p.add_argument("--timeout", type=float, default=30, help="seconds per micro-guest VM (30)")
    p.add_argument("--linux-timeout", type=float, default=300,
                   help="seconds per Linux boot (300)")
    add_common_arguments(p, "startup")
    args = p.parse_args()
    if args.help_long:
        print(__doc__)
        return 0
    if args.runs < 1 or args.other_runs < 1 or args.concurrent < 1 or args.warmup < 0 \
            or args.linux_runs < 0:
        p.error("--runs, --other-runs and --concurrent must be at least 1, --warmup and "
                "--linux-runs at least 0")
    return run_bench(StartupBench(args), "stopping the VMs")


if __name__ == "__main__":
    sys.exit(main())
