#!/usr/bin/env python3
"""Ember vs QEMU microvm: virtio-blk and virtio-net on the same Linux guest.

Boots the default guest (resources/build-guest.sh: vmlinux + uncompressed initramfs) once per run
and per monitor, interleaved (Ember, QEMU, Ember, QEMU, ...). In each boot the guest runs
/tests/bench.sh, whose helper /bin/ember-bench (resources/initramfs/ember-bench.c) times the I/O
and prints "EMBER-BENCH key=value" lines on the console:

  disk  one raw image (--image-mib, written full of zeros first, in a temp dir), /dev/vda in the
        guest: O_DIRECT sequential write of --disk-mib MiB in 1 MiB blocks (then fdatasync,
        reported apart), O_DIRECT sequential read of the same, 4 KiB O_DIRECT random reads at
        queue depth 1 for --rand-secs seconds.
  net   a network namespace ember-bench-<pid> with a TAP tap0 (10.0.2.1/24; the guest is
        10.0.2.2), nothing outside it: --pings pings from the guest (average RTT), an HTTP GET
        of --net-mib MiB from the host's busybox httpd timed in the guest (host -> guest), and
        an HTTP GET of --net-mib MiB from the guest timed on the host (guest -> host).

Also reported: seconds from the monitor's start to the guest's /init (EMBER-INIT).
Prints a Markdown table and writes it to --markdown, the raw data and the machine facts to
--json. Needs root (network namespaces, TAP) and /dev/kvm; installs qemu-system-x86 with apt-get
when it is missing and we are root. Python 3.11 standard library only.

  sudo resources/bench/bench.py [--runs 3] [--only disk|net]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (BASE_CMDLINE, CACHE, IS_PVM, MONITORS, PVM_CMDLINE, QEMU_CPU,
                      QEMU_CPU_PVM, QEMU_MACHINE, ROOT, BenchError, add_common_arguments,
                      check_kvm, find_ember, find_qemu, fmt, log, machine_facts, median_min_max,
                      run, run_bench)

HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.2"
RX_PORT, TX_PORT = 8080, 8081

# (key, label, unit, higher is better)
METRICS = [
    ("boot_s", "boot to /init", "s", False),
    ("blk_write_mibs", "virtio-blk seq write, O_DIRECT 1 MiB", "MiB/s", True),
    ("blk_flush_ms", "virtio-blk flush after the write", "ms", False),
    ("blk_read_mibs", "virtio-blk seq read, O_DIRECT 1 MiB", "MiB/s", True),
    ("blk_randread_iops", "virtio-blk 4 KiB random read, QD1", "IOPS", True),
    ("ping_avg_ms", "virtio-net ping RTT guest->host (avg)", "ms", False),
    ("net_rx_mibs", "virtio-net TCP host->guest", "MiB/s", True),
    ("net_tx_mibs", "virtio-net TCP guest->host", "MiB/s", True),
]
DISK_METRICS = {"blk_write_mibs", "blk_flush_ms", "blk_read_mibs", "blk_randread_iops"}
NET_METRICS = {"ping_avg_ms", "net_rx_mibs", "net_tx_mibs"}


# ---------------------------------------------------------------------------------------------
# `bench.py _fetch IP PORT`: run by the benchmark inside the namespace (ip netns exec) to fetch
# what the guest serves; prints {"bytes": N, "ns": T} (body bytes, connect to EOF).


def fetch(ip, port, timeout=120.0):
    deadline = time.monotonic() + 20
    while True:
        try:
            t0 = time.monotonic_ns()
            sock = socket.create_connection((ip, port), timeout=timeout)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    buf = bytearray(1 << 20)
    total, head = 0, b""
    with sock:
        sock.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            if total < 4096:
                head += bytes(buf[: min(n, 4096)])
            total += n
    ns = time.monotonic_ns() - t0
    end = head.find(b"\r\n\r\n")
    if end < 0 or not head.startswith(b"HTTP/1.0 200"):
        raise BenchError(f"bad answer from {ip}:{port}: {head[:60]!r}")
    return {"bytes": total - end - 4, "ns": ns}


# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.parts = ["disk", "net"] if args.only is None else [args.only]
        self.procs = []  # every process started, killed (by process group) on the way out
        self.lock = threading.Lock()
        self.ns = None
        self.tmp = None
        self.pvm = IS_PVM

    # -- setup -------------------------------------------------------------------------------

    def preflight(self):
        a = self.args
        if os.geteuid() != 0 and "net" in self.parts:
            raise BenchError("the net benchmark needs root (network namespace, TAP): use sudo, "
                             "or --only disk")
        check_kvm()
        self.ember = find_ember(a.ember)
        self.qemu = find_qemu(a.qemu, a.no_install)
        if a.kernel is None or a.initrd is None:
            log("resources/build-guest.sh (builds what is missing)")
            r = subprocess.run([str(ROOT / "resources/build-guest.sh")], text=True,
                               capture_output=True)
            if r.returncode != 0:
                raise BenchError("resources/build-guest.sh failed:\n" + r.stderr[-2000:])
        self.kernel = Path(a.kernel or CACHE / "default/vmlinux").resolve()
        self.initrd = Path(a.initrd or CACHE / "default/initramfs.cpio").resolve()
        for f in (self.kernel, self.initrd):
            if not f.is_file():
                raise BenchError(f"{f} not found")
        data = self.initrd.read_bytes()
        if b"bin/ember-bench" not in data or b"tests/bench.sh" not in data:
            raise BenchError(f"{self.initrd} has no /bin/ember-bench or /tests/bench.sh: rebuild "
                             "it with resources/initramfs/build-initramfs.sh (an uncompressed "
                             ".cpio is needed)")

    def machine(self):
        return {**machine_facts(self.ember, self.qemu), "kernel": str(self.kernel),
                "initrd": str(self.initrd)}

    def setup(self):
        a = self.args
        self.tmp = Path(tempfile.mkdtemp(prefix="ember-bench-"))
        self.image = self.tmp / "disk.img"
        if "disk" in self.parts:
            # Written in full (not sparse), so that every boot writes over allocated blocks.
            zeros = bytes(1 << 20)
            with open(self.image, "wb") as f:
                for _ in range(a.image_mib):
                    f.write(zeros)
                f.flush()
                os.fsync(f.fileno())
        if "net" in self.parts:
            www = self.tmp / "www"
            www.mkdir()
            with open(www / "blob", "wb") as f:
                for _ in range(a.net_mib):
                    f.write(os.urandom(1 << 20))
            name = f"ember-bench-{os.getpid()}"
            run(["ip", "netns", "add", name])
            self.ns = name
            for cmd in (["ip", "link", "set", "lo", "up"],
                        ["ip", "tuntap", "add", "tap0", "mode", "tap"],
                        ["ip", "addr", "add", f"{HOST_IP}/24", "dev", "tap0"],
                        ["ip", "link", "set", "tap0", "up"]):
                run(self.in_ns(cmd))
            self.spawn(self.in_ns(["busybox", "httpd", "-f", "-p", f"{HOST_IP}:{RX_PORT}",
                                   "-h", str(www)]), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def in_ns(self, argv):
        return ["ip", "netns", "exec", self.ns, *argv] if self.ns else list(argv)

    def spawn(self, argv, **kw):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        with self.lock:
            self.procs.append(p)
        return p

    def kill(self, p):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self):
        with self.lock:
            procs, self.procs = self.procs, []
        for p in procs:
            self.kill(p)
        if self.ns:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
            self.ns = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # -- one boot ----------------------------------------------------------------------------

    def guest_cmd(self):
        a = self.args
        return (f'ember.cmd="sh /tests/bench.sh {",".join(self.parts)} {a.disk_mib} '
                f'{a.rand_secs} {a.pings} {a.net_mib}"')

    def argv(self, monitor):
        a = self.args
        cmdline = f"{BASE_CMDLINE} {self.guest_cmd()}"
        if monitor == "ember":
            argv = [str(self.ember), "run", "--kernel", str(self.kernel), "--initrd",
                    str(self.initrd), "--memory", a.memory, "--cmdline", cmdline]
            if "disk" in self.parts:
                argv += ["--disk", f"path={self.image}"]
            if "net" in self.parts:
                argv += ["--net", "tap=tap0"]
        else:
            if self.pvm:
                cmdline += " " + PVM_CMDLINE
            argv = [self.qemu, "-M", QEMU_MACHINE, "-enable-kvm",
                    "-cpu", QEMU_CPU_PVM if self.pvm else QEMU_CPU, "-smp", "1",
                    "-m", a.memory, "-nodefaults", "-no-user-config", "-display", "none",
                    "-serial", "stdio", "-monitor", "none", "-no-reboot",
                    "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                    "-append", cmdline,
                    "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
            if "disk" in self.parts:
                # cache=writeback: the host page cache, FLUSH -> fdatasync, as Ember does.
                argv += ["-drive", f"id=d0,file={self.image},format=raw,if=none,"
                         "cache=writeback,aio=threads",
                         "-device", "virtio-blk-device,drive=d0"]
            if "net" in self.parts:
                # vhost=off: the data path in the QEMU process, as in Ember.
                argv += ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                         "-device", "virtio-net-device,netdev=n0"]
        return self.in_ns(argv)

    def boot(self, monitor, run_no):
        a = self.args
        argv = self.argv(monitor)
        logdir = Path(a.logs)
        logdir.mkdir(parents=True, exist_ok=True)
        logpath = logdir / f"{monitor}-{run_no}.log"
        res = {"monitor": monitor, "run": run_no, "log": str(logpath)}
        errors = []
        fetched = {}
        threads = []

        def do_fetch():
            try:
                r = run(self.in_ns([sys.executable, str(Path(__file__).resolve()), "_fetch",
                                    GUEST_IP, str(TX_PORT)]), timeout=a.timeout)
                if r.returncode:
                    errors.append("fetch: " + r.stderr.strip()[-300:])
                else:
                    fetched.update(json.loads(r.stdout))
            except Exception as e:  # noqa: BLE001 - reported with the run
                errors.append(f"fetch: {e}")

        t0 = time.monotonic()
        p = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def reader(logf):
            for raw in p.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                logf.write(line + "\n")
                logf.flush()
                if "EMBER-INIT" in line and "boot_s" not in res:
                    res["boot_s"] = time.monotonic() - t0
                m = re.search(r"EMBER-BENCH (\w+)=(.*)", line)
                if m:
                    key, val = m.group(1), m.group(2).strip()
                    res.setdefault("raw", {})[key] = val
                    if key == "serving":
                        t = threading.Thread(target=do_fetch, daemon=True)
                        t.start()
                        threads.append(t)
                    if key == "error":
                        errors.append(f"guest step {val} failed")
                m = re.search(r"EMBER-EXIT status=(\d+)", line)
                if m:
                    res["guest_status"] = int(m.group(1))

        with open(logpath, "w") as logf:
            logf.write("# " + " ".join(argv) + "\n")
            rt = threading.Thread(target=reader, args=(logf,), daemon=True)
            rt.start()
            try:
                rc = p.wait(timeout=a.timeout)
            except subprocess.TimeoutExpired:
                self.kill(p)
                rc = None
                errors.append(f"timeout after {a.timeout} s")
            rt.join(timeout=10)
            for t in threads:
                t.join(timeout=a.timeout)
        res["wall_s"] = round(time.monotonic() - t0, 2)
        res["exit_code"] = rc
        if rc is not None:
            # Ember exits with the guest's status; QEMU's isa-debug-exit with (status << 1) | 1.
            status = rc if monitor == "ember" else (rc >> 1 if rc & 1 else None)
            if status != 0:
                errors.append(f"{monitor} exited with {rc} (see {logpath})")
        if fetched:
            res.setdefault("raw", {})["net_tx_bytes"] = str(fetched["bytes"])
            res["raw"]["net_tx_ns"] = str(fetched["ns"])
        res["metrics"] = self.metrics(res.get("raw", {}), res.get("boot_s"), errors)
        res["errors"] = errors
        return res

    def metrics(self, raw, boot_s, errors):
        m = {"boot_s": boot_s}

        def rate(key):
            try:
                b, ns = int(raw[f"{key}_bytes"]), int(raw[f"{key}_ns"])
            except (KeyError, ValueError):
                return None
            return b / (1 << 20) / (ns / 1e9) if ns else None

        if "disk" in self.parts:
            m["blk_write_mibs"] = rate("blk_write")
            m["blk_read_mibs"] = rate("blk_read")
            m["blk_flush_ms"] = int(raw["blk_flush_ns"]) / 1e6 if "blk_flush_ns" in raw else None
            try:
                m["blk_randread_iops"] = (int(raw["blk_randread_ops"])
                                          / (int(raw["blk_randread_ns"]) / 1e9))
            except (KeyError, ValueError, ZeroDivisionError):
                m["blk_randread_iops"] = None
        if "net" in self.parts:
            rtt = re.match(r"([\d.]+)/([\d.]+)/([\d.]+)", raw.get("ping_rtt_ms", ""))
            m["ping_avg_ms"] = float(rtt.group(2)) if rtt else None
            m["net_rx_mibs"] = rate("net_rx")
            m["net_tx_mibs"] = rate("net_tx")
            want = self.args.net_mib << 20
            for key in ("net_rx", "net_tx"):
                if raw.get(f"{key}_bytes") not in (None, str(want)):
                    errors.append(f"{key}: {raw[f'{key}_bytes']} bytes, not {want}")
        for k, v in m.items():
            if v is None:
                errors.append(f"no value for {k}")
        return m

    # -- the whole benchmark -----------------------------------------------------------------

    def run(self):
        a = self.args
        self.preflight()
        facts = self.machine()
        log(f"{facts['kvm']}, {facts['cpu']}, {facts['qemu']}, {facts['ember']}")
        self.setup()
        runs = []
        for i in range(1, a.runs + 1):
            for monitor in MONITORS:
                log(f"run {i}/{a.runs}: {monitor} ...")
                r = self.boot(monitor, i)
                shown = ", ".join(f"{k}={fmt(v)}" for k, v in r["metrics"].items())
                log(f"run {i}/{a.runs}: {monitor}: {shown} (wall {r['wall_s']} s)")
                for e in r["errors"]:
                    log(f"  ERROR: {e}")
                runs.append(r)
        summary = self.summarize(runs)
        facts["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        doc = {"machine": facts, "config": self.config(), "summary": summary, "runs": runs}
        md = self.markdown(facts, summary, runs)
        print(md)
        for path, text in ((a.markdown, md), (a.json, json.dumps(doc, indent=2) + "\n")):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        log(f"wrote {a.markdown} and {a.json}; console logs in {a.logs}")
        return 1 if any(r["errors"] for r in runs) else 0

    def config(self):
        a = self.args
        return {"runs": a.runs, "parts": self.parts, "image_mib": a.image_mib,
                "disk_mib": a.disk_mib, "rand_secs": a.rand_secs, "pings": a.pings,
                "net_mib": a.net_mib, "memory": a.memory, "ember_argv": self.argv("ember"),
                "qemu_argv": self.argv("qemu")}

    def summarize(self, runs):
        out = {}
        for key, label, unit, higher in METRICS:
            if (key in DISK_METRICS and "disk" not in self.parts) or \
                    (key in NET_METRICS and "net" not in self.parts):
                continue
            row = {"label": label, "unit": unit, "higher_is_better": higher}
            for mon in MONITORS:
                vals = [r["metrics"].get(key) for r in runs if r["monitor"] == mon]
                vals = [v for v in vals if v is not None]
                if vals:
                    med, lo, hi = median_min_max(vals)
                    row[mon] = {"median": med, "min": lo, "max": hi, "n": len(vals),
                                "values": vals}
            if "ember" in row and "qemu" in row and row["qemu"]["median"]:
                row["ratio_ember_qemu"] = row["ember"]["median"] / row["qemu"]["median"]
            # Run i of Ember against run i of QEMU, booted right after it: the pairs share the
            # host's load of the moment, so their spread shows how noisy the host was.
            pairs = []
            for i in range(1, self.args.runs + 1):
                e, q = ([r["metrics"].get(key) for r in runs if r["monitor"] == m and r["run"] == i]
                        for m in MONITORS)
                if e and q and e[0] is not None and q[0]:
                    pairs.append(e[0] / q[0])
            row["paired_ratios"] = pairs
            out[key] = row
        return out

    def markdown(self, facts, summary, runs):
        a = self.args
        lines = [
            f"Ember vs QEMU microvm, {a.runs} boot(s) each, interleaved; {facts['kvm']}, "
            f"{facts['cpu']} ({facts['host_cpus']} host CPUs), {facts['qemu']}, "
            f"{facts['ember']}; guest: 1 vCPU, {a.memory}; {facts['date']}.",
            "",
            "| metric | unit | Ember median (min–max) | QEMU median (min–max) | Ember/QEMU "
            "| per run |",
            "|---|---|---|---|---|---|",
        ]
        for key, row in summary.items():
            cells = []
            for mon in MONITORS:
                s = row.get(mon)
                cells.append(f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"
                             if s else "–")
            ratio = row.get("ratio_ember_qemu")
            better = "higher" if row["higher_is_better"] else "lower"
            lines.append(f"| {row['label']} | {row['unit']} ({better} is better) | {cells[0]} | "
                         f"{cells[1]} | {f'{ratio:.2f}' if ratio else '–'} | "
                         f"{' '.join(f'{x:.2f}' for x in row['paired_ratios']) or '–'} |")
        bad = [f"{r['monitor']} run {r['run']}: {'; '.join(r['errors'])}" for r in runs
               if r["errors"]]
        if bad:
            lines += ["", "Errors:", *[f"- {b}" for b in bad]]
        return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "_fetch":
        print(json.dumps(fetch(sys.argv[2], int(sys.argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring (--help-long) for details.")
    p.add_argument("--runs", type=int, default=3, help="boots per monitor (default 3)")
    p.add_argument("--only", choices=["disk", "net"], help="run one part only")
    p.add_argument("--image-mib", type=int, default=256, help="disk image size (256)")
    p.add_argument("--disk-mib", type=int, default=32, help="MiB written then read (32)")
    p.add_argument("--rand-secs", type=int, default=5, help="random-read seconds (5)")
    p.add_argument("--pings", type=int, default=20, help="pings (20, 0.2 s apart)")
    p.add_argument("--net-mib", type=int, default=4, help="MiB each way over TCP (4)")
    p.add_argument("--memory", default="256M", help="guest RAM (256M)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per boot (420, min 240)")
    p.add_argument("--kernel", help="guest kernel (default: the default guest's vmlinux)")
    p.add_argument("--initrd", help="guest initramfs (default: the default guest's .cpio)")
    p.add_argument("--logs", default=str(ROOT / "target/bench/logs"),
                   help="console logs, one per boot")
    add_common_arguments(p, "results")
    args = p.parse_args()
    if args.help_long:
        print(__doc__)
        return 0
    if args.runs < 1 or args.disk_mib < 1 or args.net_mib < 1 or args.pings < 1 \
            or args.rand_secs < 1:
        p.error("--runs, --disk-mib, --net-mib, --pings and --rand-secs must be at least 1")
    if args.disk_mib > args.image_mib:
        p.error("--disk-mib must not exceed --image-mib")
    args.timeout = max(args.timeout, 240)

    return run_bench(Bench(args), "stopping the VMs, deleting the namespace")


if __name__ == "__main__":
    sys.exit(main())
