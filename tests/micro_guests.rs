//! The core monitor, tested end to end: the real `ember` binary boots the micro-guests under
//! `resources/guests/` (tiny freestanding kernels built from this repository) and the tests check
//! what the guest printed and how ember exited.

mod common;

use std::time::Duration;

use common::{kvm_available, micro_guest, run, run_with_input};

const TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Memory-map lines `mem: <addr> <size> <type>` parsed into numbers.
fn memory_map(lines: &[String]) -> Vec<(u64, u64, u32)> {
    lines
        .iter()
        .map(|l| {
            let mut parts = l.split_whitespace();
            let mut hex =
                || u64::from_str_radix(parts.next().unwrap().trim_start_matches("0x"), 16).unwrap();
            let (addr, size) = (hex(), hex());
            let kind = l.split_whitespace().nth(2).unwrap().parse().unwrap();
            (addr, size, kind)
        })
        .collect()
}

fn ram_total(map: &[(u64, u64, u32)]) -> u64 {
    map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum()
}

/// Boots an info guest and checks it saw the cmdline, memory map and initrd it was given.
fn check_info_guest(guest: &str, memory: &str, expected_ram: u64) {
    let initrd = std::env::temp_dir().join(format!("ember-test-initrd-{guest}-{memory}"));
    std::fs::write(
        &initrd,
        b"\x11\x22\x33\x44\x55\x66\x77\x88 and the rest of the initrd",
    )
    .unwrap();
    let kernel = micro_guest(guest);
    let r = run(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            memory,
            "--cmdline",
            "hello=world console=ttyS0",
        ],
        TIMEOUT,
    );
    std::fs::remove_file(&initrd).ok();
    assert_eq!(r.code(), 0, "{r:?}");
    r.assert_line(&format!("ember-guest: {guest}"));
    let cmdline = r.lines_with("cmdline: ");
    assert_eq!(cmdline.len(), 1, "{r:?}");
    assert!(
        cmdline[0].starts_with("hello=world console=ttyS0"),
        "{cmdline:?}"
    );
    assert!(
        cmdline[0].contains("noxsave clearcpuid=151,59,308,298,534") || !ember_uses_software_kvm()
    );
    let map = memory_map(&r.lines_with("mem: "));
    assert_eq!(ram_total(&map), expected_ram, "{map:x?}");
    assert!(
        map.iter()
            .all(|e| e.0 + e.1 <= 0xc000_0000 || e.0 >= 0x1_0000_0000),
        "{map:x?}"
    );
    r.assert_line("initrd: size=35 head=1122334455667788");
    r.assert_line("done");
}

fn ember_uses_software_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// RAM the guest is told about: everything but the legacy 0x9fc00..1 MiB hole.
fn usable(memory: u64) -> u64 {
    memory - (0x10_0000 - 0x9fc00)
}

#[test]
fn pvh_entry_sees_cmdline_memory_map_and_initrd() {
    if !kvm_available() {
        return;
    }
    check_info_guest("pvh-info", "64M", usable(64 * MIB));
}

#[test]
fn linux_64bit_entry_sees_cmdline_memory_map_and_initrd() {
    if !kvm_available() {
        return;
    }
    check_info_guest("linux64-info", "64M", usable(64 * MIB));
}

#[test]
fn bzimage_entry_sees_cmdline_memory_map_and_initrd() {
    if !kvm_available() {
        return;
    }
    check_info_guest("bzimage-info", "64M", usable(64 * MIB));
}

#[test]
fn memory_above_the_hole_is_mapped_at_4g() {
    if !kvm_available() {
        return;
    }
    check_info_guest("pvh-info", "3584M", usable(3584 * MIB));
    check_info_guest("linux64-info", "5G", usable(5 * 1024 * MIB));
}

fn run_guest(guest: &str, extra: &[&str]) -> common::Run {
    let kernel = micro_guest(guest);
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args, TIMEOUT)
}

#[test]
fn guest_reset_exits_zero() {
    if !kvm_available() {
        return;
    }
    let r = run_guest("exit-reset", &[]);
    r.assert_line("ember-guest: exit-reset");
    assert_eq!(r.code(), 0, "{r:?}");
}

#[test]
fn acpi_poweroff_exits_zero() {
    if !kvm_available() {
        return;
    }
    let r = run_guest("exit-poweroff", &[]);
    r.assert_line("acpi: sleep-control port=0x600");
    assert_eq!(r.code(), 0, "{r:?}");
}

/// `boot timer: guest wrote 0xNN at T ms` lines of ember's log, as (value, milliseconds).
fn boot_timer_marks(stderr: &str) -> Vec<(u8, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            l.split_once("boot timer: guest wrote 0x")?
                .1
                .split_once(" at ")
        })
        .map(|(value, time)| {
            let ms = time.strip_suffix(" ms").expect("milliseconds");
            (u8::from_str_radix(value, 16).unwrap(), ms.parse().unwrap())
        })
        .collect()
}

#[test]
fn boot_timer_logs_each_mark_with_the_time_since_start() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("boot-timer");
    let r = run(
        &["-v", "run", "--kernel", kernel.to_str().unwrap()],
        TIMEOUT,
    );
    assert_eq!(r.code(), 0, "{r:?}");
    r.assert_line("boot-timer: marked 0x42");
    let marks = boot_timer_marks(&r.stderr);
    assert_eq!(marks.len(), 2, "{r:?}");
    assert_eq!((marks[0].0, marks[1].0), (0x41, 0x42), "{r:?}");
    let (first, second) = (marks[0].1, marks[1].1);
    assert!(first > 0.0 && first <= second, "{r:?}");
    assert!(
        second < r.elapsed.as_secs_f64() * 1000.0,
        "a mark later than the whole run: {r:?}"
    );
    // Without -v the marks are not logged.
    let quiet = run(&["run", "--kernel", kernel.to_str().unwrap()], TIMEOUT);
    assert_eq!(quiet.code(), 0, "{quiet:?}");
    assert!(boot_timer_marks(&quiet.stderr).is_empty(), "{quiet:?}");
}

#[test]
fn debug_exit_status_becomes_the_exit_code() {
    if !kvm_available() {
        return;
    }
    for status in ["0", "1", "42", "255"] {
        let r = run_guest("exit-status", &["--cmdline", &format!("status={status}")]);
        r.assert_line(&format!("status: {status}"));
        assert_eq!(r.code().to_string(), status, "{r:?}");
    }
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_available() {
        return;
    }
    let r = run_guest("exit-triple-fault", &[]);
    assert_eq!(r.code(), 121, "{r:?}");
    assert!(
        r.stderr
            .contains("triple fault (KVM_EXIT_SHUTDOWN) on vCPU 0 at RIP 0x"),
        "{r:?}"
    );
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r:?}");
}

#[test]
fn emulation_failure_names_rip_and_instruction() {
    if !kvm_available() {
        return;
    }
    let r = run_guest("exit-emulation-failure", &[]);
    assert_eq!(r.code(), 122, "{r:?}");
    assert!(r.stderr.contains("KVM_EXIT_INTERNAL_ERROR"), "{r:?}");
    assert!(r.stderr.contains("at RIP 0x"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r:?}");
}

fn stop_with_signal(signal: i32, expected: i32) {
    let kernel = micro_guest("exit-hang");
    // The signal lands while the vCPUs are in KVM_RUN: the guest has said it is hanging.
    let child = common::spawn_until(
        &["run", "--kernel", kernel.to_str().unwrap(), "--cpus", "2"],
        "hanging",
    );
    common::send_signal(&child, signal);
    let r = common::finish(child, Duration::from_secs(10));
    assert_eq!(r.code(), expected, "{r:?}");
    assert!(
        r.stderr.contains(&format!("stopped by signal {signal}")),
        "{r:?}"
    );
}

#[test]
fn sigterm_and_sigint_stop_the_vm() {
    if !kvm_available() {
        return;
    }
    stop_with_signal(libc::SIGTERM, 143);
    stop_with_signal(libc::SIGINT, 130);
}

fn smp(cpus: u8) {
    let cpus_arg = cpus.to_string();
    let r = run_guest("smp", &["--cpus", &cpus_arg]);
    assert_eq!(r.code(), 0, "{r:?}");
    r.assert_line(&format!("mp: cpus={cpus}"));
    r.assert_line(&format!("cpus up: {cpus}"));
    for cpu in 1..cpus {
        r.assert_line(&format!("cpu {cpu} up"));
    }
}

#[test]
fn every_vcpu_comes_up() {
    if !kvm_available() {
        return;
    }
    smp(1);
    smp(2);
    smp(8);
}

#[test]
fn piped_serial_input_reaches_the_guest_without_loss() {
    if !kvm_available() {
        return;
    }
    // Far more than the 64-byte FIFO, with no byte equal to the guest's 'Q' terminator.
    let payload: Vec<u8> = (0..6000u32)
        .map(|i| b"abcdefghij\n"[(i % 11) as usize])
        .collect();
    let mut input = payload.clone();
    input.push(b'Q');
    let kernel = micro_guest("echo");
    let r = run_with_input(
        &["run", "--kernel", kernel.to_str().unwrap()],
        &input,
        TIMEOUT,
    );
    assert_eq!(r.code(), 0, "{r:?}");
    r.assert_line("echo: 6000 bytes");
    let echoed = r.stdout.split("echo: ready").nth(1).expect("ready marker");
    let expected = String::from_utf8(payload).unwrap();
    assert!(
        echoed.replace("\r\n", "\n").contains(&expected),
        "echo lost bytes"
    );
}

#[test]
fn console_file_and_off() {
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join("ember-test-console.txt");
    let console = format!("file={}", path.display());
    let r = run_guest(
        "exit-status",
        &["--cmdline", "status=3", "--console", &console],
    );
    assert_eq!(r.code(), 3);
    assert_eq!(r.stdout, "");
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(written.contains("status: 3"), "{written}");
    std::fs::remove_file(&path).ok();
    let r = run_guest(
        "exit-status",
        &["--cmdline", "status=4", "--console", "off"],
    );
    assert_eq!((r.code(), r.stdout.as_str()), (4, ""));
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn guest_ram_is_reserved_lazily() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("exit-hang");
    let child = common::spawn_until(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "4G",
        ],
        "hanging",
    );
    let rss = rss_kib(child.id());
    common::send_signal(&child, libc::SIGTERM);
    common::finish(child, Duration::from_secs(10));
    // The guest touched a few pages of its 4 GiB; the monitor itself is a few MiB.
    assert!(
        rss < 64 * 1024,
        "RSS {rss} KiB for a 4 GiB guest that touched almost nothing"
    );
}

/// Runs the hostile micro-guest for `rounds` rounds with a disk and a vsock device; returns how it
/// ended, its output, and ember's peak RSS in KiB (from wait4).
fn hostile_run(rounds: u32, dir: &std::path::Path) -> (i32, String, i64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let disk = dir.join(format!("disk-{rounds}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let kernel = micro_guest("hostile");
    let mut child = common::spawn(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &format!("iterations={rounds} seed=7"),
            "--disk",
            &format!("path={}", disk.display()),
            "--vsock",
            &format!(
                "cid=3,socket={}",
                dir.join(format!("v{rounds}.sock")).display()
            ),
        ],
        std::process::Stdio::null(),
    );
    let collector = common::OutputCollector::start(child.stdout.take().unwrap());
    let output = collector.output.clone();
    let pid = child.id() as i32;
    // A guest that hangs Ember must not hang the test.
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + TIMEOUT;
            while !done.load(Ordering::SeqCst) {
                if std::time::Instant::now() > deadline {
                    // SAFETY: kill(2) on our child, not yet reaped (done is still false).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, with valid pointers to locals.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    assert_eq!(waited, pid);
    // Reaped by wait4 already (for its rusage): std's wait finds nothing left, which is fine.
    let _ = child.wait();
    collector.join();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    let text = output.lock().unwrap().clone();
    (code, text, usage.ru_maxrss)
}

/// A guest that writes seeded random values to every port and MMIO register Ember emulates
/// (and to ones nothing answers), with a disk and a vsock device attached: Ember survives it,
/// ends with the guest's own status, and its memory does not grow with the number of rounds.
#[test]
fn a_hostile_guest_cannot_crash_ember_or_grow_it() {
    if !kvm_available() {
        return;
    }
    let dir = common::scratch_dir("hostile");
    let (code, out, small) = hostile_run(2_000, &dir);
    assert_eq!(code, 42, "{out}");
    assert!(out.contains("hostile: done"), "{out}");
    let (code, out, large) = hostile_run(20_000, &dir);
    assert_eq!(code, 42, "{out}");
    assert!(out.contains("hostile: done"), "{out}");
    // Ten times the rounds, not more memory: 1 MiB of slack for allocator and page-cache noise.
    assert!(
        large - small < 1024,
        "peak RSS {small} KiB after 2000 rounds, {large} KiB after 20000"
    );
    std::fs::remove_dir_all(&dir).ok();
}
