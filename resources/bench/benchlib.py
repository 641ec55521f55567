"""What Ember's benchmarks (bench.py: devices, startup.py: start-up) share: how QEMU microvm is
run for comparison, the machine facts every report carries, and number formatting.
Python 3.11 standard library only."""

import datetime
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where `cargo build --release` puts ember (.cargo/config.toml names the target).
EMBER = ROOT / "target/x86_64-unknown-linux-gnu/release/ember"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ember"
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet tsc=reliable"
# What Ember appends on software KVM (kvm_pvm), given to QEMU by hand.
PVM_CMDLINE = "noxsave clearcpuid=151,59,308,298,534,297,580"
# QEMU's CPU: the host's, minus what kvm_pvm cannot do (Ember hides the same on kvm_pvm).
QEMU_CPU = "host,-arch-capabilities,-kvm-pv-ipi,-kvm-pv-unhalt,-kvm-pv-sched-yield"
QEMU_CPU_PVM = QEMU_CPU + ",-cx16"
# microvm without ACPI (the guest kernel has none): QEMU then lists its virtio-mmio devices on
# the kernel command line, as Ember does.
QEMU_MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off"
MONITORS = ("ember", "qemu")
IS_PVM = os.path.exists("/sys/module/kvm_pvm")


class BenchError(Exception):
    pass


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(argv, check=True, **kw):
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)


def median_min_max(values):
    return statistics.median(values), min(values), max(values)


def fmt(v):
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def check_kvm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not readable and writable")


def find_ember(path):
    ember = Path(path)
    if not os.access(ember, os.X_OK):
        raise BenchError(f"{ember} not found: build it with `cargo build --release`")
    return ember


def find_qemu(name, no_install):
    """The QEMU binary; installs Debian's qemu-system-x86 when missing and we are root."""
    qemu = shutil.which(name)
    if qemu:
        return qemu
    if os.geteuid() != 0 or no_install:
        raise BenchError(f"{name} not found: install it with "
                         "`apt-get install qemu-system-x86` (QEMU 7.2 on Debian 12)")
    log("installing qemu-system-x86 (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                    "qemu-system-x86"], check=True, env=env)
    qemu = shutil.which(name)
    if not qemu:
        raise BenchError(f"{name} still not found after installing qemu-system-x86")
    return qemu


def machine_facts(ember, qemu):
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    qemu_version = run([qemu, "--version"]).stdout.splitlines()[0]
    ember_version = run([str(ember), "--version"], check=False).stdout.strip()
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                 check=False).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kvm": "kvm_pvm (software KVM)" if IS_PVM else "hardware KVM",
        "kvm_pvm": IS_PVM,
        "cpu": cpu,
        "host_cpus": os.cpu_count(),
        "host_kernel": os.uname().release,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "qemu": qemu_version,
        "ember": f"{ember_version} ({commit})" if commit else ember_version,
    }


def add_common_arguments(parser, results_name):
    """The options both benchmarks take: the binaries, and where the results go
    (target/bench/RESULTS_NAME.{md,json})."""
    parser.add_argument("--ember", default=str(EMBER))
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install QEMU")
    parser.add_argument("--markdown", default=str(ROOT / f"target/bench/{results_name}.md"))
    parser.add_argument("--json", default=str(ROOT / f"target/bench/{results_name}.json"))
    parser.add_argument("--help-long", action="store_true", help="print the full description")


def run_bench(bench, interrupted_message):
    """Runs `bench.run()` and returns its exit status; SIGTERM and SIGHUP stop it like Ctrl-C, and
    `bench.cleanup()` runs on every way out (2: a BenchError, 130: interrupted)."""

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        return bench.run()
    except BenchError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log(f"interrupted: {interrupted_message}")
        return 130
    finally:
        bench.cleanup()
