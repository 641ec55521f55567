#!/usr/bin/env python3
"""Images and volumes, in one run: what --image costs, and how a volume reads against the image.

  first_line_s     spawn -> the first stdout line of `ember run [--image debian.tar] -- echo hi`:
                   the default guest against a cached Debian bookworm image (a read-only virtio-blk
                   disk and an overlay root more)
  convert_s        spawn -> ember's log line "image ... (built)" for the Debian tarball with an
                   empty image cache (digest, unpack, mke2fs -d), and the same line when cached
  read_mib_s       in the guest, `cat` of a 16 MiB file right after boot (nothing of it in the
                   guest's page cache) from the image disk (virtio-blk, ext4 below the overlay) and
                   from a volume (virtio-fs, virtiofsd --cache auto; the host's page cache holds
                   it); the guest times itself with /proc/uptime (10 ms steps). Ember against QEMU
                   microvm + the same virtiofsd, with the same kernel, initramfs, ext4 file,
                   command line and guest script

Runs are interleaved. Prints a Markdown table and writes it to --markdown, with the raw samples
in --json. Needs /dev/kvm, virtiofsd, mmdebstrap (resources/debian-image.sh) and QEMU (installed
with apt-get when missing and we are root). Python 3.11 standard library only.

  resources/bench/images.py [--runs 3]
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (BASE_CMDLINE, CACHE, EMBER, IS_PVM, PVM_CMDLINE, QEMU_CPU, QEMU_CPU_PVM,
                      QEMU_MACHINE, ROOT, BenchError, add_common_arguments, check_kvm,
                      find_ember, find_qemu, fmt, log, machine_facts, median_min_max, run_bench)

MEMORY_MIB = 512
BLOB_BYTES = 16 << 20
# The guest script: /proc/uptime in centiseconds around each read.
BENCH_SH = """t() { read -r u _ </proc/uptime; echo "${u%.*}${u#*.}"; }
a=$(t); cat /data/blob >/dev/null; b=$(t); cat /blob >/dev/null; c=$(t)
echo "READ volume_cs=$((b - a)) image_cs=$((c - b))"
"""
READ_RE = re.compile(r"READ volume_cs=(\d+) image_cs=(\d+)")
IMAGE_RE = re.compile(r"image \S+ -> (\S+) \((built|cached)\)")


def find_virtiofsd():
    for candidate in (shutil.which("virtiofsd"),
                      Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin/virtiofsd"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BenchError("virtiofsd not found: resources/install-deps.sh installs it")


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="ember-bench-images-"))
        self.samples = {k: [] for k in (
            "first_line_default_s", "first_line_image_s", "convert_built_s", "convert_cached_s",
            "read_image_ember_mib_s", "read_volume_ember_mib_s",
            "read_image_qemu_mib_s", "read_volume_qemu_mib_s")}
        self.live = []

    def preflight(self):
        check_kvm()
        self.ember = find_ember(self.args.ember)
        self.qemu = find_qemu(self.args.qemu, self.args.no_install)
        self.virtiofsd = find_virtiofsd()
        default = CACHE / "default"
        self.kernel = (default / "vmlinux").resolve()
        self.initrd = (default / "initramfs.cpio").resolve()
        if not self.kernel.exists() or not self.initrd.exists():
            raise BenchError("the default guest is not built: run resources/build-guest.sh")
        made = subprocess.run([str(ROOT / "resources/debian-image.sh")], check=True,
                              capture_output=True, text=True)
        self.debian = made.stdout.strip()
        # The read benchmark's image: busybox and a 16 MiB file of fixed pseudo-random bytes (a
        # stable content hash, so the ext4 is built once), and the same file in the volume.
        self.root = self.tmp / "root"
        (self.root / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", self.root / "bin/busybox")
        (self.root / "bin/sh").symlink_to("busybox")
        (self.root / "data").mkdir()
        blob = random.Random(13).randbytes(BLOB_BYTES)
        (self.root / "blob").write_bytes(blob)
        (self.root / "bench.sh").write_text(BENCH_SH)
        self.volume = self.tmp / "volume"
        self.volume.mkdir()
        (self.volume / "blob").write_bytes(blob)

    def ember_run(self, extra, timeout=900, env=None, stop_at=None):
        """Runs ember with `extra`; returns (seconds to the first stdout line, seconds to the
        first stderr line matching `stop_at` (then kills it), stdout, stderr, status)."""
        argv = [str(self.ember), "-v", "run", "--kernel", str(self.kernel),
                "--initrd", str(self.initrd), "--memory", f"{MEMORY_MIB}M"] + extra
        start = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.live.append(p)
        stopped = None
        err = []
        if stop_at:
            for line in p.stderr:
                err.append(line.decode(errors="replace"))
                if stop_at.search(err[-1]):
                    stopped = time.monotonic() - start
                    p.kill()
                    break
        first = None
        out = []
        for line in p.stdout:
            if first is None:
                first = time.monotonic() - start
            out.append(line.decode(errors="replace"))
        err.append(p.stderr.read().decode(errors="replace"))
        status = p.wait(timeout)
        self.live.remove(p)
        return first, stopped, "".join(out), "".join(err), status

    def first_lines(self):
        first, _, out, err, status = self.ember_run(["--", "echo", "hi"])
        self.check("default guest", status, out, err)
        self.samples["first_line_default_s"].append(first)
        first, _, out, err, status = self.ember_run(["--image", self.debian, "--", "echo", "hi"])
        self.check("debian image", status, out, err)
        self.samples["first_line_image_s"].append(first)

    def conversion(self):
        cache = self.tmp / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, XDG_CACHE_HOME=str(cache))
        for key, want in (("convert_built_s", "built"), ("convert_cached_s", "cached")):
            _, stopped, _, err, _ = self.ember_run(["--image", self.debian, "--", "true"],
                                                   env=env, stop_at=IMAGE_RE)
            m = IMAGE_RE.search(err)
            if stopped is None or not m or m.group(2) != want:
                raise BenchError(f"no 'image ... ({want})' line: {err[-2000:]}")
            self.samples[key].append(stopped)
        shutil.rmtree(cache, ignore_errors=True)

    def reads_ember(self):
        cmdline = f'{BASE_CMDLINE} ember.cmd="sh /bench.sh"'
        _, _, out, err, status = self.ember_run(
            ["--image", str(self.root), "--volume", f"{self.volume}:/data", "--cmdline", cmdline])
        self.check("ember reads", status, out, err)
        self.ext4 = IMAGE_RE.search(err).group(1)
        self.add_reads("ember", out, err)

    def reads_qemu(self):
        socket = self.tmp / "vfs.sock"
        daemon = subprocess.Popen([self.virtiofsd, "--socket-path", str(socket), "--shared-dir",
                                   str(self.volume), "--cache", "auto"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.live.append(daemon)
        try:
            for _ in range(500):
                if socket.exists():
                    break
                time.sleep(0.01)
            cmdline = (f"{BASE_CMDLINE} {PVM_CMDLINE if IS_PVM else ''} ember.image=/dev/vda "
                       f'ember.volumes=vol0=/data ember.cmd="sh /bench.sh"')
            argv = [self.qemu, "-M", f"{QEMU_MACHINE},memory-backend=mem", "-enable-kvm",
                    "-cpu", QEMU_CPU_PVM if IS_PVM else QEMU_CPU, "-smp", "1",
                    "-m", f"{MEMORY_MIB}M", "-object",
                    f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
                    "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                    "-monitor", "none", "-no-reboot", "-device", "i8042",
                    "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
                    "-drive", f"id=img,file={self.ext4},format=raw,if=none,readonly=on",
                    "-device", "virtio-blk-device,drive=img",
                    "-chardev", f"socket,id=vfs,path={socket}",
                    "-device", "vhost-user-fs-device,chardev=vfs,tag=vol0",
                    "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                    "-append", cmdline]
            p = subprocess.run(argv, capture_output=True, text=True, timeout=900)
            # isa-debug-exit: (status << 1) | 1.
            self.check("qemu reads", 0 if p.returncode == 1 else p.returncode, p.stdout,
                       p.stderr)
            self.add_reads("qemu", p.stdout, p.stderr)
        finally:
            daemon.kill()
            daemon.wait()
            self.live.remove(daemon)

    def add_reads(self, monitor, out, err):
        m = READ_RE.search(out)
        if not m:
            raise BenchError(f"{monitor}: no READ line: {out[-2000:]} {err[-1000:]}")
        mib = BLOB_BYTES / (1 << 20)
        for key, cs in (("volume", m.group(1)), ("image", m.group(2))):
            seconds = max(int(cs), 1) / 100
            self.samples[f"read_{key}_{monitor}_mib_s"].append(mib / seconds)

    def check(self, what, status, out, err):
        if status != 0:
            raise BenchError(f"{what}: exit status {status}: {out[-1500:]} {err[-1500:]}")

    def run(self):
        self.preflight()
        facts = machine_facts(self.ember, self.qemu)
        log(f"{facts['kvm']}, {facts['cpu']}, {facts['qemu']}, {facts['ember']}")
        for i in range(self.args.runs):
            log(f"run {i + 1}/{self.args.runs}: first lines, conversion, reads")
            self.first_lines()
            self.conversion()
            self.reads_ember()
            self.reads_qemu()
        table = self.markdown(facts)
        print(table)
        Path(self.args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.markdown).write_text(table + "\n")
        Path(self.args.json).write_text(json.dumps({"facts": facts, "samples": self.samples},
                                                   indent=2))
        return 0

    def cell(self, key, unit):
        m = median_min_max(self.samples[key])
        return f"{fmt(m[0])} {unit} ({fmt(m[1])}–{fmt(m[2])})", m[0]

    def markdown(self, facts):
        size = Path(self.debian).stat().st_size / (1 << 20)
        lines = [f"{facts['kvm']}, {facts['cpu']}, {facts['host_cpus']} host CPUs; "
                 f"{facts['qemu']}; {facts['ember']}; 1 vCPU, {MEMORY_MIB} MiB; "
                 f"{self.args.runs} runs; {facts['date']}.", "",
                 "| metric | value | against |", "|---|---|---|"]
        d, dv = self.cell("first_line_default_s", "s")
        i, iv = self.cell("first_line_image_s", "s")
        lines.append(f"| first line of `echo hi`, Debian image (cached) | {i} | default guest "
                     f"{d}; ratio {fmt(iv / dv)} |")
        b, _ = self.cell("convert_built_s", "s")
        c, _ = self.cell("convert_cached_s", "s")
        lines.append(f"| Debian tarball ({size:.0f} MiB) → ext4 | {b} | cached: {c} |")
        for where in ("image", "volume"):
            e, ev = self.cell(f"read_{where}_ember_mib_s", "MiB/s")
            q, qv = self.cell(f"read_{where}_qemu_mib_s", "MiB/s")
            lines.append(f"| 16 MiB read from the {where} | Ember {e} | QEMU {q}; "
                         f"Ember/QEMU {fmt(ev / qv)} |")
        return "\n".join(lines)

    def cleanup(self):
        for p in self.live:
            p.kill()
            p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    add_common_arguments(p, "images")
    args = p.parse_args()
    if args.help_long:
        print(__doc__)
        return 0
    if args.ember == str(EMBER) and not EMBER.exists():
        raise SystemExit(f"{EMBER} not found: build it with `cargo build --release`")
    return run_bench(Bench(args), "images benchmark")


if __name__ == "__main__":
    sys.exit(main())
