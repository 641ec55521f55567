#!/usr/bin/env python3
"""podman with ember-runtime against podman with runc: `podman run --rm IMAGE true`, and what a
running container's process weighs.

The image is a busybox root the script imports (there is no registry). Each runtime runs
`podman run --rm --network none IMAGE true` --runs times, interleaved (runc, ember, runc, ...)
after one unrecorded run of each; then a container `sleep 120` is started detached under each
and the resident memory of the process podman reports as the container's (`podman inspect
{{.State.Pid}}`: for runc the container's own process, for Ember the monitor, its guest's RAM
counted apart) is read, and the container removed. podman runs with a private configuration
(vfs storage, cgroupfs, ulimits within this sandbox's hard limits), as tests/podman.rs does.

  resources/bench/runtime.py [--runs 5]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, BenchError, log
from startup import rss_without_guest_ram_kib

RUNTIME = ROOT / "target/x86_64-unknown-linux-gnu/release/ember-runtime"
IMAGE = "localhost/ember-bench:1"
GUEST_MEMORY_MIB = 512  # ember-runtime's default VM size


def podman(tmp, *args, check=True):
    argv = ["podman", "--root", str(tmp / "storage"), "--runroot", str(tmp / "run"),
            "--storage-driver", "vfs", *args]
    env = dict(os.environ, CONTAINERS_CONF=str(tmp / "containers.conf"))
    r = subprocess.run(argv, text=True, capture_output=True, env=env)
    if check and r.returncode:
        raise BenchError(f"{' '.join(args[:3])}: {r.returncode}: {r.stderr[-500:]}")
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="recorded runs per runtime (5)")
    p.add_argument("--markdown", default=str(ROOT / "target/bench/runtime.md"))
    p.add_argument("--json", default=str(ROOT / "target/bench/runtime.json"))
    a = p.parse_args()
    try:
        if not shutil.which("podman") or not shutil.which("runc"):
            raise BenchError("podman and runc are needed: resources/install-deps.sh installs them")
        if not RUNTIME.exists():
            raise BenchError(f"{RUNTIME} not found: cargo build --release")
        with tempfile.TemporaryDirectory(prefix="ember-runtime-bench-") as t:
            tmp = Path(t)
            (tmp / "containers.conf").write_text(
                '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
                '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
            root = tmp / "rootfs"
            (root / "bin").mkdir(parents=True)
            shutil.copy("/bin/busybox", root / "bin/busybox")
            for applet in ("sh", "true", "sleep"):
                os.symlink("busybox", root / "bin" / applet)
            subprocess.run(["tar", "-C", str(root), "-cf", str(tmp / "rootfs.tar"), "."],
                           check=True)
            podman(tmp, "import", str(tmp / "rootfs.tar"), IMAGE)
            runtimes = {"runc": "runc", "ember": str(RUNTIME)}
            times = {name: [] for name in runtimes}
            for round_ in range(a.runs + 1):
                for name, runtime in runtimes.items():
                    t0 = time.perf_counter()
                    podman(tmp, "run", "--rm", "--runtime", runtime, "--network", "none",
                           IMAGE, "true")
                    if round_ > 0:
                        times[name].append(time.perf_counter() - t0)
                log(f"round {round_ + 1} of {a.runs + 1}")
            memory = {}
            for name, runtime in runtimes.items():
                cid = podman(tmp, "run", "-d", "--runtime", runtime, "--network", "none",
                             IMAGE, "sleep", "120").stdout.strip()
                pid = int(podman(tmp, "inspect", "--format", "{{.State.Pid}}",
                                 cid).stdout.strip())
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                rss = int(next(l.split()[1] for l in rollup.splitlines()
                               if l.startswith("Rss:")))
                entry = {"pid": pid, "rss_kib": rss}
                if name == "ember":
                    entry["rss_without_guest_ram_kib"] = rss_without_guest_ram_kib(
                        pid, GUEST_MEMORY_MIB * 1024)
                memory[name] = entry
                podman(tmp, "rm", "-f", "-t", "0", cid, check=False)
            podman(tmp, "rmi", "-a", "-f", check=False)
        summary = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
                   for name, v in times.items()}
        table = markdown(summary, memory, a.runs)
        print(table)
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(table)
        Path(a.json).write_text(json.dumps({"times": times, "summary": summary,
                                            "memory": memory}, indent=2))
    except BenchError as e:
        print(f"runtime.py: {e}", file=sys.stderr)
        sys.exit(1)


def markdown(summary, memory, runs):
    ember, runc = summary["ember"], summary["runc"]
    lines = [f"{runs} runs each, interleaved; median (min–max)", "",
             "| metric | runc | ember-runtime | ember / runc |", "|---|---|---|---|",
             f"| `podman run --rm IMAGE true` | {runc['median_s']:.2f} s "
             f"({runc['min_s']:.2f}–{runc['max_s']:.2f}) | {ember['median_s']:.2f} s "
             f"({ember['min_s']:.2f}–{ember['max_s']:.2f}) | "
             f"{ember['median_s'] / runc['median_s']:.1f} |",
             f"| RSS of the container's process (ember: its monitor) | "
             f"{memory['runc']['rss_kib'] / 1024:.2f} MiB | "
             f"{memory['ember']['rss_kib'] / 1024:.1f} MiB | |",
             f"| … not counting guest RAM | | "
             f"{memory['ember']['rss_without_guest_ram_kib'] / 1024:.2f} MiB | |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
