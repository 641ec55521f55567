#!/usr/bin/env python3
"""What the sandbox costs at start-up: Ember with seccomp off, on (the default), jailed, and
jailed with cgroup limits, against QEMU microvm, in one interleaved run.

The guest is startup.elf (resources/guests/bench/startup.S): it prints one line on COM1 and
resets through the i8042. For each variant, after --warmup unrecorded boots, --runs boots are
made in turn (off, on, jail, jail+cgroup, QEMU, off, on, ...), and reported as min/median/max:

  first_line_ms   spawn -> the guest's line read from the monitor's stdout
  exit_ms         spawn -> the monitor's exit seen by waitpid

with each variant's median minus the one before it (what seccomp adds to "off", what the jail
adds to seccomp, what the cgroup adds to the jail) and the ratio to QEMU. --jail needs root.

  resources/bench/sandbox.py [--runs 30]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (IS_PVM, add_common_arguments, QEMU_CPU, QEMU_CPU_PVM, QEMU_MACHINE, ROOT, BenchError, check_kvm,
                      find_ember, find_qemu, fmt, log, machine_facts, median_min_max)
from startup import GUEST_LINE, MEMORY_MIB, Proc

VARIANTS = (
    ("off", ["--seccomp", "off"]),
    ("seccomp", []),
    ("jail", ["--jail"]),
    ("jail+cgroup", ["--jail", "--cpu-quota", "100", "--memory-limit", "512M"]),
)
QEMU = "qemu"
METRICS = ("first_line_ms", "exit_ms")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="recorded boots per variant (30)")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded boots first (3)")
    p.add_argument("--timeout", type=float, default=30, help="seconds per VM (30)")
    add_common_arguments(p, "sandbox")
    a = p.parse_args()
    try:
        check_kvm()
        ember = find_ember(a.ember)
        qemu = find_qemu(a.qemu, a.no_install)
        r = subprocess.run(["make", "-s", "-C", str(ROOT / "resources/guests")], text=True,
                           capture_output=True)
        if r.returncode:
            raise BenchError("building the micro-guests failed:\n" + r.stderr[-2000:])
        kernel = ROOT / "target/guests/startup.elf"
        argvs = {name: [str(ember), "run", "--kernel", str(kernel), "--memory",
                        f"{MEMORY_MIB}M", *extra] for name, extra in VARIANTS}
        argvs[QEMU] = [qemu, "-M", QEMU_MACHINE, "-enable-kvm", "-cpu",
                       QEMU_CPU_PVM if IS_PVM else QEMU_CPU, "-smp", "1", "-m",
                       f"{MEMORY_MIB}M", "-nodefaults", "-no-user-config", "-display", "none",
                       "-serial", "stdio", "-monitor", "none", "-no-reboot", "-device", "i8042",
                       "-kernel", str(kernel)]
        samples = {name: {m: [] for m in METRICS} for name in argvs}
        with tempfile.TemporaryDirectory(prefix="ember-sandbox-bench-") as tmp:
            for round_ in range(a.warmup + a.runs):
                for name, argv in argvs.items():
                    first, exit_ = one_boot(argv, Path(tmp), a.timeout)
                    if round_ >= a.warmup:
                        samples[name]["first_line_ms"].append(first)
                        samples[name]["exit_ms"].append(exit_)
                if round_ % 10 == 9:
                    log(f"{round_ + 1} rounds")
        facts = machine_facts(ember, qemu)
        summary = {name: {m: dict(zip(("median", "min", "max"), median_min_max(v)))
                          for m, v in s.items()}
                   for name, s in samples.items()}
        table = markdown(summary, a.runs)
        print(table)
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(table)
        Path(a.json).write_text(json.dumps({"facts": facts, "samples": samples,
                                            "summary": summary}, indent=2))
    except BenchError as e:
        print(f"sandbox.py: {e}", file=sys.stderr)
        sys.exit(1)


def one_boot(argv, tmp, timeout):
    """spawn -> first line and spawn -> exit of one VM, in ms."""
    with tempfile.TemporaryFile(dir=tmp) as stderr_file:
        p = Proc(argv, stderr_file)
        deadline = time.perf_counter() + timeout
        try:
            t_line = p.read_until(GUEST_LINE, deadline)
            t_exit = p.wait(deadline)
        finally:
            p.kill()
        if t_line is None or p.status != 0:
            stderr_file.seek(0)
            raise BenchError(f"{argv[0]} {' '.join(argv[-4:])}: status {p.status}, stdout "
                             f"{p.output[-200:]!r}, stderr {stderr_file.read()[-300:]!r}")
        return (t_line - p.t0) * 1e3, (t_exit - p.t0) * 1e3


def markdown(summary, runs):
    lines = [f"{runs} boots each, interleaved; median (min–max); Δ: the median minus the row "
             "above's", "",
             "| variant | spawn → first line | Δ | spawn → exit | Δ | first line / QEMU |",
             "|---|---|---|---|---|---|"]
    qemu_first = summary[QEMU]["first_line_ms"]["median"]
    previous = None
    for name in [v[0] for v in VARIANTS] + [QEMU]:
        s = summary[name]
        cells = [name]
        for m in METRICS:
            med = s[m]
            cells.append(f"{fmt(med['median'])} ms ({fmt(med['min'])}–{fmt(med['max'])})")
            if previous and name != QEMU:
                cells.append(f"{med['median'] - summary[previous][m]['median']:+.2f} ms")
            else:
                cells.append("")
        cells.append(f"{s['first_line_ms']['median'] / qemu_first:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
        previous = name
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
