//! `ember-agent`: runs commands inside the guest for the host.
//!
//! ```text
//! ember-agent [--listen vsock:PORT|unix:PATH] [--ready vsock:CID:PORT|unix:PATH|none] [--root DIR]
//!             [--net NAME:ADDRESS/PREFIX:GATEWAY:MTU,…] [--hostname NAME]
//! ```
//!
//! With `--root DIR` every command runs chrooted into DIR (the guest's image, mounted by /init):
//! the agent itself lives outside it, so any image works, even one without a shell. `--net` and
//! `--hostname` (from the kernel command line, through /init) configure the guest before it is
//! ready: a container's network addresses and name.
//!
//! It listens (by default on vsock port [`AGENT_PORT`](wire::AGENT_PORT)), then tells the host it is ready by
//! connecting to the ready address (by default the host's vsock port
//! [`READY_PORT`](wire::READY_PORT)) and sending
//! `Hello` and `Ready`, and keeps that connection open so the host sees the agent die. Each
//! accepted connection runs one command, on its own thread. The Unix socket forms are for tests
//! on the host. Logs go to stderr, which in the guest is the console.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use ember_agent::wire::{self, Message, VERSION};

/// One line to stderr. Unlike `eprintln!`, never panics if stderr is gone: the agent must keep
/// serving with no console.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), "ember-agent: {}", format_args!($($arg)*));
    }};
}

mod guest_net;
mod net;
mod refresh;
mod session;
mod spawn;
mod user;

use net::{ListenAddr, Listener, ReadyAddr, Stream};

/// The byte written to the boot timer's port when the agent is ready: Ember's /init writes 0x60
/// when it starts, so 0x61 is the next mark of the boot.
const BOOT_MARK_READY: u8 = 0x61;
/// The boot timer's I/O port.
const BOOT_TIMER_PORT: u64 = 0x80;
/// Stack for each connection's thread: the loop keeps its buffers on the heap.
const THREAD_STACK: usize = 256 << 10;

struct Args {
    listen: ListenAddr,
    ready: ReadyAddr,
    root: Option<std::path::PathBuf>,
    interfaces: Vec<ember_agent::interface::InterfaceConfig>,
    hostname: Option<String>,
}

const USAGE: &str =
    "usage: ember-agent [--listen vsock:PORT|unix:PATH] [--ready vsock:CID:PORT|unix:PATH|none] \
     [--root DIR] [--net NAME:ADDRESS/PREFIX:GATEWAY:MTU,…] [--hostname NAME]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        listen: ListenAddr::default(),
        ready: ReadyAddr::default(),
        root: None,
        interfaces: Vec::new(),
        hostname: None,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => parsed.listen = value()?.parse()?,
            "--ready" => parsed.ready = value()?.parse()?,
            "--root" => parsed.root = Some(value()?.into()),
            "--net" => parsed
                .interfaces
                .extend(ember_agent::interface::parse_list(&value()?)?),
            "--hostname" => parsed.hostname = Some(value()?),
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                log!("{e}");
            }
            log!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(root) = args.root {
        if !root.is_dir() {
            log!("--root {}: not a directory", root.display());
            return ExitCode::from(2);
        }
        log!("commands run in {}", root.display());
        spawn::set_root(root);
    }
    // Before the host hears "ready": a container's first command may use the network at once.
    // A failure is logged and the agent serves anyway (commands without the network still run).
    for interface in &args.interfaces {
        match guest_net::configure(interface) {
            Ok(()) => log!("{interface} configured"),
            Err(e) => log!("cannot configure {e}"),
        }
    }
    if let Some(name) = &args.hostname {
        if let Err(e) = guest_net::set_hostname(name) {
            log!("cannot set the host name {name:?}: {e}");
        }
    }
    // Children are reaped with waitpid: an inherited SIGCHLD=SIG_IGN would have the kernel
    // reap them first and lose their exit status.
    // SAFETY: setting a signal disposition to the default; no handler runs.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };

    let listener = match Listener::bind(&args.listen) {
        Ok(listener) => listener,
        Err(e) => {
            log!("cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    log!("listening on {} (wire version {VERSION})", args.listen);
    // Only in the guest (vsock): on a host, port 0x80 is real hardware.
    if matches!(args.listen, ListenAddr::Vsock { .. }) {
        mark_boot();
    }
    // Held for the agent's whole life: the host takes its closing as the agent's death.
    let ready = args.ready;
    if let Some(first) = announce(&ready, true) {
        let spawned = thread::Builder::new()
            .name("ready".into())
            .stack_size(THREAD_STACK)
            .spawn(move || keep_announced(first, &ready));
        if let Err(e) = spawned {
            log!("no thread for the ready connection: {e}");
        }
    }

    // Only in the guest: under test on a host, the host's clock and RNG are not the agent's.
    let in_guest = matches!(args.listen, ListenAddr::Vsock { .. });
    let next_id = AtomicU64::new(1);
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of fds or memory: wait for connections to finish rather than spin.
                log!("accept: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let spawned = thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(THREAD_STACK)
            .spawn(move || session::serve(id, stream, in_guest));
        if let Err(e) = spawned {
            log!("[{id}] no thread for the connection: {e}");
        }
    }
}

/// Tells the host the agent is up: Hello, then Ready, on a connection kept open. A failure is
/// logged (when `log_unreachable`, or once connected) and the agent serves anyway (a host may
/// connect without waiting for Ready).
fn announce(addr: &ReadyAddr, log_unreachable: bool) -> Option<Stream> {
    let mut stream = match Stream::connect(addr) {
        Ok(Some(stream)) => stream,
        Ok(None) => return None,
        Err(e) => {
            if log_unreachable {
                log!("cannot reach the host at {addr}: {e}");
            }
            return None;
        }
    };
    let sent = wire::write_message(&mut stream, &Message::Hello { version: VERSION })
        .and_then(|()| wire::write_message(&mut stream, &Message::Ready));
    match sent {
        Ok(()) => {
            log!("ready (told {addr})");
            Some(stream)
        }
        Err(e) => {
            log!("cannot tell the host at {addr} we are ready: {e}");
            None
        }
    }
}

/// How often, and how many times, the agent tries to tell a host again after its ready
/// connection broke: a restored snapshot's host starts listening within moments.
const REANNOUNCE_INTERVAL: Duration = Duration::from_millis(200);
const REANNOUNCE_ATTEMPTS: u32 = 50;

/// Holds the ready connection; when it breaks (a snapshot of this guest was restored by another
/// host process, whose vsock device reset every connection), says Hello and Ready again, so the
/// new host learns the agent is there. Gives up after a few seconds of nobody listening: the host
/// that closed the connection may simply be gone.
fn keep_announced(mut stream: Stream, addr: &ReadyAddr) {
    loop {
        let mut byte = [0u8; 1];
        // The host never writes here: this returns when the connection ends.
        let _ = stream.read(&mut byte);
        log!("the ready connection ended; announcing again");
        let mut again = None;
        // At once first: a warm start waits for exactly this.
        for attempt in 0..REANNOUNCE_ATTEMPTS {
            if attempt > 0 {
                thread::sleep(REANNOUNCE_INTERVAL);
            }
            again = announce(addr, false);
            if again.is_some() {
                break;
            }
        }
        match again {
            Some(next) => stream = next,
            None => return,
        }
    }
}

/// Writes a mark to the boot timer (port 0x80): through /dev/port when the kernel has it, or
/// else with ioperm and an `out` instruction (the default guest's kernel has no /dev/port; the
/// agent runs as root). Best effort: without either the boot simply has no mark.
fn mark_boot() {
    if let Ok(port) = OpenOptions::new().write(true).open("/dev/port") {
        let _ = port.write_at(&[BOOT_MARK_READY], BOOT_TIMER_PORT);
        return;
    }
    // SAFETY: ioperm only changes this thread's I/O permission bitmap for port 0x80.
    if unsafe { libc::ioperm(BOOT_TIMER_PORT as libc::c_ulong, 1, 1) } != 0 {
        return;
    }
    // SAFETY: ioperm just granted this thread port 0x80, the boot timer's (a POST-code port on
    // a PC, harmless to write); the instruction touches no memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") BOOT_TIMER_PORT as u16, in("al") BOOT_MARK_READY,
            options(nomem, nostack, preserves_flags));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_agent::wire::{AGENT_PORT, READY_PORT};

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_are_the_vsock_ports() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.listen, ListenAddr::Vsock { port: AGENT_PORT });
        assert_eq!(
            args.ready,
            ReadyAddr::Vsock {
                cid: 2,
                port: READY_PORT
            }
        );
    }

    #[test]
    fn flags_take_a_value_either_way() {
        let args = parse(&["--listen", "unix:/a", "--ready=none", "--root", "/mnt/root"]).unwrap();
        assert_eq!(args.listen, ListenAddr::Unix("/a".into()));
        assert_eq!(args.root, Some("/mnt/root".into()));
        assert_eq!(args.ready, ReadyAddr::None);
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        let args = parse(&[
            "--net",
            "eth0:10.0.0.2/24:10.0.0.1:1400,eth1:::",
            "--hostname=c1",
        ])
        .unwrap();
        assert_eq!(args.interfaces.len(), 2);
        assert_eq!(args.interfaces[0].mtu, Some(1400));
        assert_eq!(args.hostname.as_deref(), Some("c1"));
        assert!(parse(&["--net", "eth0"]).is_err());
        assert!(parse(&["--ready", "vsock:x:1"]).is_err());
    }
}
