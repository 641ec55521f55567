//! `ember-runtime`: an OCI runtime whose containers are Ember microVMs, with the command line
//! runc defines (what podman's conmon and containerd's runc shim call).
//!
//! A second binary rather than `ember` under another name: its command line is runc's, global
//! options before the command, nothing in common with `ember run`'s, and a runtime is
//! configured by path (`podman --runtime /usr/local/bin/ember-runtime`), so a separate file is
//! what every caller expects. It runs `ember` from its own directory for each container.
//!
//! A container is a monitor process, `ember run` in job mode holding its command at a start
//! gate: `create` starts it and returns once the guest agent is ready (its PID is the
//! container's), `start` opens the gate, the monitor exits with the process's status.

pub mod console;
pub mod network;
pub mod spec;
pub mod state;

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::job::gate;
use network::{Namespace, NetworkError};
use spec::{monitor_plan, Spec, SpecError};
use state::{process_start, Container, StateError, Status, Stored};

/// How long `create` waits for the guest agent (a Linux boot: tens of seconds on software KVM).
const READY_WITHIN: Duration = Duration::from_secs(600);

#[derive(Debug, Parser)]
#[command(
    name = "ember-runtime",
    version = concat!(env!("CARGO_PKG_VERSION"), "\nspec: ", "1.0.2"),
    about = "An OCI runtime whose containers are Ember microVMs"
)]
pub struct Cli {
    /// Where containers' state is kept
    #[arg(long, value_name = "DIR", default_value = "/run/ember-runtime")]
    pub root: PathBuf,
    /// Append errors to this file too
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// The --log file's format
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Accepted for compatibility: the monitor's cgroup is the caller's
    #[arg(long)]
    pub systemd_cgroup: bool,
    /// Accepted for compatibility
    #[arg(long)]
    pub debug: bool,
    #[command(subcommand)]
    pub command: RuntimeCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// Start the container's VM, up to its agent; the process waits for `start`
    Create(CreateArgs),
    /// Run the created container's process
    Start(IdArgs),
    /// The container's OCI state (JSON)
    State(IdArgs),
    /// Send a signal to the container's process (SIGKILL ends the VM)
    Kill(KillArgs),
    /// Remove a stopped container (--force: a running one too)
    Delete(DeleteArgs),
    /// What this runtime supports (JSON)
    Features,
    /// The container's processes seen from the host: its monitor
    Ps(PsArgs),
    /// Run another process in a container (not supported yet)
    Exec(ExecArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The bundle: config.json and the root it names
    #[arg(long, short, value_name = "DIR", default_value = ".")]
    pub bundle: PathBuf,
    /// Write the container's PID (its monitor's) here
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// With process.terminal: where the terminal's master is sent (SCM_RIGHTS)
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for compatibility (the VM has a root of its own)
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for compatibility
    #[arg(long)]
    pub no_new_keyring: bool,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    pub id: String,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Accepted for compatibility (the VM is one process tree)
    #[arg(long, short)]
    pub all: bool,
    pub id: String,
    /// A name (TERM, SIGTERM) or number
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kill a container that still runs
    #[arg(long, short)]
    pub force: bool,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    #[arg(long, short, default_value = "table")]
    pub format: String,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The process to run, as config.json's `process` (args, env, cwd, user)
    #[arg(long, short, value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// With a terminal: where its master is sent (SCM_RIGHTS)
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Return at once; the process's PID (its `ember exec`) goes to --pid-file
    #[arg(long, short)]
    pub detach: bool,
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Without --process: a terminal (its master goes to --console-socket)
    #[arg(long, short)]
    pub tty: bool,
    /// Without --process: the working directory
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Without --process: KEY=VALUE (repeatable)
    #[arg(long, short, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Without --process: UID[:GID]
    #[arg(long, short, value_name = "UID[:GID]")]
    pub user: Option<String>,
    pub id: String,
    /// Without --process: the command and its arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error("the bundle {0}: {1}")]
    Bundle(PathBuf, #[source] io::Error),
    #[error("cannot find ember next to ember-runtime ({0}): install both in one directory")]
    NoEmber(PathBuf),
    #[error("cannot start the container's monitor: {0}")]
    Spawn(#[source] io::Error),
    #[error(
        "the container's VM ended before its guest agent was ready ({0}); its stderr says why"
    )]
    MonitorEnded(String),
    #[error("the container's VM was not ready within {0:?}")]
    NotReady(Duration),
    #[error("cannot write the PID file {0}: {1}")]
    PidFile(PathBuf, #[source] io::Error),
    #[error("container {0} is {1}, not created: it cannot be started")]
    NotCreated(String, Status),
    #[error("cannot start container {0}: {1}")]
    Start(String, #[source] io::Error),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("{0:?} is not a signal")]
    BadSignal(String),
    #[error("cannot signal container {0}: {1}")]
    Kill(String, #[source] io::Error),
    #[error("container {0} is {1}: stop it first, or delete --force")]
    StillRunning(String, Status),
    #[error("exec: no command (give --process FILE or the command after the ID)")]
    ExecNoCommand,
    #[error("exec: cannot read {0}: {1}")]
    ExecProcess(PathBuf, String),
    #[error("cannot run ember exec: {0}")]
    ExecSpawn(#[source] io::Error),
}

/// Runs the command line; errors are one line on stderr and in `--log`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first).to_string();
            // The log options, when they came before the mistake.
            let (log, format) = log_options_from(std::env::args().collect());
            report(log.as_deref(), format, &first);
            return ExitCode::from(2);
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(
                cli.log.as_deref(),
                cli.log_format,
                &crate::outcome::error_line(&e),
            );
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> Result<(), RuntimeError> {
    match &cli.command {
        RuntimeCommand::Create(args) => create(cli, args),
        RuntimeCommand::Start(args) => start(&cli.root, &args.id),
        RuntimeCommand::State(args) => {
            let container = Container::open(&cli.root, &args.id)?;
            let json = serde_json::to_string_pretty(&container.oci_state())
                .unwrap_or_else(|_| "{}".into());
            println!("{json}");
            Ok(())
        }
        RuntimeCommand::Kill(args) => kill(&cli.root, &args.id, &args.signal),
        RuntimeCommand::Delete(args) => delete(&cli.root, &args.id, args.force),
        RuntimeCommand::Features => {
            println!("{}", features());
            Ok(())
        }
        RuntimeCommand::Ps(args) => {
            let container = Container::open(&cli.root, &args.id)?;
            let pids: Vec<i32> = container
                .stored
                .pid
                .filter(|_| container.monitor_alive())
                .into_iter()
                .collect();
            if args.format == "json" {
                println!("{}", serde_json::to_string(&pids).unwrap_or_default());
            } else {
                println!("PID");
                for pid in pids {
                    println!("{pid}");
                }
            }
            Ok(())
        }
        RuntimeCommand::Exec(args) => exec(&cli.root, args),
    }
}

/// `create`: the monitor up to "agent ready", its PID in the state and the PID file.
fn create(cli: &Cli, args: &CreateArgs) -> Result<(), RuntimeError> {
    state::check_id(&args.id)?;
    let bundle =
        fs::canonicalize(&args.bundle).map_err(|e| RuntimeError::Bundle(args.bundle.clone(), e))?;
    let spec = Spec::load(&bundle)?;
    let plan = monitor_plan(&spec, &bundle)?;
    let namespace = spec.network_namespace()?;
    let terminal = spec.process.as_ref().is_some_and(|p| p.terminal);
    let console_socket = match (terminal, &args.console_socket) {
        (false, _) => None,
        (true, None) => return Err(console::ConsoleError::NoSocket.into()),
        (true, Some(socket)) => Some(socket.as_path()),
    };
    let mut skipped = plan.skipped.clone();
    let ember = ember_binary()?;
    let mut container = Container::create(
        &cli.root,
        Stored {
            id: args.id.clone(),
            bundle: bundle.clone(),
            pid: None,
            start_time: None,
            started: false,
            annotations: spec.annotations.clone(),
            network_namespace: None,
            taps: Vec::new(),
            socket_dir: None,
        },
    )?;
    let result = start_container(
        &mut container,
        &namespace,
        &plan.args,
        &ember,
        console_socket,
        &mut skipped,
    );
    for what in &skipped {
        log_line(
            cli.log.as_deref(),
            cli.log_format,
            "warning",
            &format!("not given to the VM: {what}"),
        );
    }
    match result {
        Ok(pid) => {
            if let Some(path) = &args.pid_file {
                write_atomically(path, pid.to_string().as_bytes())
                    .map_err(|e| RuntimeError::PidFile(path.clone(), e))?;
            }
            Ok(())
        }
        Err(e) => {
            if let Some(path) = &container.stored.network_namespace {
                network::unplumb(path, &container.stored.taps);
            }
            let _ = container.remove();
            Err(e)
        }
    }
}

/// Joins the container's network, gives its interfaces to the VM, makes its terminal (its
/// master sent to `console_socket`) and starts the monitor; the state records what was made as
/// it is made, for the caller to undo on failure.
fn start_container(
    container: &mut Container,
    namespace: &Namespace,
    plan_args: &[String],
    ember: &Path,
    console_socket: Option<&Path>,
    skipped: &mut Vec<String>,
) -> Result<i32, RuntimeError> {
    network::enter(namespace)?;
    // A vsock socket in the container's directory: `exec` reaches the agent through it.
    let vsock = format!("cid=3,socket={}", container.vsock().display());
    let mut monitor_args = plan_args.to_vec();
    monitor_args.splice(1..1, ["--vsock".to_string(), vsock]);
    if let Namespace::Join(path) = namespace {
        container.stored.network_namespace = Some(path.clone());
        let plumbed = network::plumb(skipped, &mut container.stored.taps)?;
        container.save()?;
        for net in plumbed.into_iter().rev() {
            monitor_args.splice(1..1, ["--net".to_string(), net]);
        }
    }
    let pty = match console_socket {
        Some(socket) => {
            let pty = console::open()?;
            console::send_master(socket, &pty)?;
            Some(pty)
        }
        None => None,
    };
    let pid = start_monitor(ember, &monitor_args, &container.gate(), pty.as_ref())?;
    container.stored.pid = Some(pid);
    container.stored.start_time = process_start(pid).map(|(_, start)| start);
    container.save()?;
    Ok(pid)
}

/// Starts `ember ARGS` with its start gate at `gate`, its stdio ours; returns its PID once it
/// says "created". The monitor outlives us (the caller's subreaper inherits it).
fn start_monitor(
    ember: &Path,
    args: &[String],
    gate_path: &Path,
    pty: Option<&console::Pty>,
) -> Result<i32, RuntimeError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(RuntimeError::Spawn(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and ours alone.
    let (ready_read, ready_write) =
        unsafe { (fs::File::from_raw_fd(fds[0]), fs::File::from_raw_fd(fds[1])) };
    let write_fd = ready_write.as_raw_fd();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let mut command = Command::new(ember);
    command
        .args(&args[..split])
        .arg("--start-gate")
        .arg(gate_path)
        .arg("--ready-fd")
        .arg(write_fd.to_string())
        .args(&args[split..]);
    // SAFETY: the closure only makes one async-signal-safe call (fcntl) on a descriptor that is
    // open in the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            // The ready pipe's write end is the one descriptor the monitor inherits.
            if libc::fcntl(write_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(pty) = pty {
        console::attach(&mut command, &pty.slave).map_err(RuntimeError::Spawn)?;
    }
    let mut child = command.spawn().map_err(RuntimeError::Spawn)?;
    drop(ready_write);
    let pid = child.id() as i32;
    match wait_for_line(&ready_read, READY_WITHIN) {
        Ok(line) if line.trim_end() == gate::CREATED => Ok(pid),
        Ok(_) => {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            Err(RuntimeError::MonitorEnded(status))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(RuntimeError::NotReady(READY_WITHIN))
        }
    }
}

/// One line from `file` (empty at end of file), within `timeout`.
fn wait_for_line(file: &fs::File, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut pollfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        // SAFETY: one initialised pollfd.
        let n = unsafe { libc::poll(&mut pollfd, 1, left.as_millis().min(60_000) as i32) };
        if n > 0 {
            break;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
    }
    let mut line = String::new();
    BufReader::new(file).read_line(&mut line)?;
    Ok(line)
}

/// `exec`: another process in a running container, through its guest agent (`ember exec` on the
/// monitor's vsock socket). Without --detach this process becomes `ember exec` and ends with
/// the process's status; with it, `ember exec` runs on (the caller's subreaper inherits it) and
/// its PID goes to --pid-file.
fn exec(root: &Path, args: &ExecArgs) -> Result<(), RuntimeError> {
    let container = Container::open(root, &args.id)?;
    if container.status() != Status::Running {
        return Err(RuntimeError::NotRunning(args.id.clone()));
    }
    let process = match &args.process {
        Some(path) => {
            let text = fs::read(path)
                .map_err(|e| RuntimeError::ExecProcess(path.clone(), e.to_string()))?;
            serde_json::from_slice::<spec::Process>(&text)
                .map_err(|e| RuntimeError::ExecProcess(path.clone(), e.to_string()))?
        }
        None => {
            let (uid, gid) = match args
                .user
                .as_deref()
                .map(|u| u.split_once(':').unwrap_or((u, "0")))
            {
                Some((uid, gid)) => (uid.parse().unwrap_or(0), gid.parse().unwrap_or(0)),
                None => (0, 0),
            };
            spec::Process {
                terminal: args.tty,
                user: spec::User {
                    uid,
                    gid,
                    additional_gids: Vec::new(),
                },
                args: args.command.clone(),
                env: args.env.clone(),
                cwd: args.cwd.clone().unwrap_or_default(),
                rlimits: Vec::new(),
                no_new_privileges: false,
            }
        }
    };
    if process.args.is_empty() {
        return Err(RuntimeError::ExecNoCommand);
    }
    let mut command = Command::new(ember_binary()?);
    command
        .arg("exec")
        .arg("--vsock")
        .arg(container.vsock())
        .arg("-i");
    // Held until `ember exec` has started: the slave is its stdio by then.
    let mut _pty = None;
    if process.terminal {
        let socket = args
            .console_socket
            .as_ref()
            .ok_or(console::ConsoleError::NoSocket)?;
        let pty = console::open()?;
        console::send_master(socket, &pty)?;
        console::attach(&mut command, &pty.slave).map_err(RuntimeError::ExecSpawn)?;
        command.arg("-t");
        _pty = Some(pty);
    }
    command
        .args(spec::process_flags(&process)?)
        .arg("--")
        .args(&process.args);
    if args.detach {
        let child = command.spawn().map_err(RuntimeError::ExecSpawn)?;
        if let Some(path) = &args.pid_file {
            write_atomically(path, child.id().to_string().as_bytes())
                .map_err(|e| RuntimeError::PidFile(path.clone(), e))?;
        }
        return Ok(());
    }
    use std::os::unix::process::CommandExt;
    // Only returns on failure.
    Err(RuntimeError::ExecSpawn(command.exec()))
}

fn start(root: &Path, id: &str) -> Result<(), RuntimeError> {
    let mut container = Container::open(root, id)?;
    let status = container.status();
    if status != Status::Created {
        return Err(RuntimeError::NotCreated(id.into(), status));
    }
    gate::start(&container.gate()).map_err(|e| RuntimeError::Start(id.into(), e))?;
    container.stored.started = true;
    container.save()?;
    Ok(())
}

fn kill(root: &Path, id: &str, signal: &str) -> Result<(), RuntimeError> {
    let container = Container::open(root, id)?;
    let signal = parse_signal(signal).ok_or_else(|| RuntimeError::BadSignal(signal.into()))?;
    let pid = match (container.stored.pid, container.monitor_alive()) {
        (Some(pid), true) => pid,
        _ => return Err(RuntimeError::NotRunning(id.into())),
    };
    // The monitor hands SIGTERM, SIGINT and SIGHUP to the process in the guest; SIGKILL ends
    // the VM.
    // SAFETY: kill(2) on the monitor's PID, checked just above to be that process.
    if unsafe { libc::kill(pid, signal) } < 0 {
        return Err(RuntimeError::Kill(id.into(), io::Error::last_os_error()));
    }
    Ok(())
}

fn delete(root: &Path, id: &str, force: bool) -> Result<(), RuntimeError> {
    let container = Container::open(root, id)?;
    let status = container.status();
    if matches!(status, Status::Created | Status::Running) {
        if !force {
            return Err(RuntimeError::StillRunning(id.into(), status));
        }
        if let Some(pid) = container.stored.pid {
            // SAFETY: kill(2) on the monitor's PID, which monitor_alive matched to it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while container.monitor_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Some(path) = &container.stored.network_namespace {
        network::unplumb(path, &container.stored.taps);
    }
    container.remove()?;
    Ok(())
}

/// `SIGTERM`, `TERM` or `15`.
fn parse_signal(text: &str) -> Option<i32> {
    if let Ok(number) = text.parse::<i32>() {
        return (1..=64).contains(&number).then_some(number);
    }
    let name = text.strip_prefix("SIG").unwrap_or(text);
    let signal = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    };
    Some(signal)
}

/// `features`, as runtime-spec's features document.
fn features() -> String {
    let features = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": state::OCI_VERSION,
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {
            "namespaces": [],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "org.ember.runtime.isolation": "microvm"
        }
    });
    serde_json::to_string_pretty(&features).unwrap_or_default()
}

/// `ember`, next to this binary.
fn ember_binary() -> Result<PathBuf, RuntimeError> {
    let me = std::env::current_exe().unwrap_or_default();
    let ember = me.with_file_name("ember");
    if ember.is_file() {
        Ok(ember)
    } else {
        Err(RuntimeError::NoEmber(ember))
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let temporary = path.with_extension("tmp-ember");
    fs::write(&temporary, data)?;
    fs::rename(&temporary, path)
}

/// An error: one line on stderr, and in `log` as the caller asked.
fn report(log: Option<&Path>, format: LogFormat, message: &str) {
    eprintln!("ember-runtime: error: {message}");
    log_line(log, format, "error", message);
}

fn log_line(log: Option<&Path>, format: LogFormat, level: &str, message: &str) {
    let Some(log) = log else { return };
    let line = match format {
        LogFormat::Json => {
            serde_json::json!({"level": level, "msg": message, "time": now()}).to_string()
        }
        LogFormat::Text => format!("{} {level}: {message}", now()),
    };
    if let Ok(mut file) = fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(file, "{line}");
    }
}

/// The time as RFC 3339, UTC.
fn now() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since.as_secs() as libc::time_t;
    // SAFETY: an all-zero tm is a valid value for gmtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: gmtime_r reads `seconds` and writes `tm`, both locals.
    unsafe { libc::gmtime_r(&seconds, &mut tm) };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        since.subsec_nanos()
    )
}

/// `--log` and `--log-format` from raw arguments (for errors clap found before parsing them).
fn log_options_from(args: Vec<String>) -> (Option<PathBuf>, LogFormat) {
    let mut log = None;
    let mut format = LogFormat::Text;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (key, value) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || value.clone().or_else(|| args.next());
        match key.as_str() {
            "--log" => log = value().map(PathBuf::from),
            "--log-format" if value().as_deref() == Some("json") => format = LogFormat::Json,
            _ => {}
        }
    }
    (log, format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("KILL"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("0"), None);
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[test]
    fn log_options_are_found_before_a_parse_error() {
        let args = [
            "ember-runtime",
            "--log",
            "/x.log",
            "--log-format=json",
            "bogus",
        ]
        .map(String::from)
        .to_vec();
        let (log, format) = log_options_from(args);
        assert_eq!(log, Some(PathBuf::from("/x.log")));
        assert_eq!(format, LogFormat::Json);
    }

    #[test]
    fn rfc3339_time() {
        let t = now();
        assert_eq!(t.len(), "2026-12-03T19:41:12.000000000Z".len(), "{t}");
        assert!(t.ends_with('Z'));
    }
}
