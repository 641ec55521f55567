//! `ember`: parse the command line, build and run the VM, exit with a code that says how it ended.

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use ember::cli::{Cli, Command};
use ember::config::ConsoleConfig;
use ember::job::gate::StartGate;
use ember::outcome::{error_line, EXIT_SETUP_FAILED, EXIT_USAGE};
use ember::rootfs::Rootfs;
use ember::sandbox::jail::{self, Entered};
use ember::sandbox::seccomp::{self, VmShape};
use ember::vmm;

fn main() -> ExitCode {
    // The boot timer's zero: as early as ember can take it.
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.verbose);
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Exec(args) => {
            let spec = match args.job.spec(args.command) {
                Ok(spec) => spec,
                Err(e) => return fail(&e),
            };
            let outcome = ember::job::exec(&args.vsock, &spec);
            ember::terminal::restore();
            if !outcome.is_clean() {
                eprintln!("ember: {outcome}");
            }
            return ExitCode::from(outcome.exit_code());
        }
        Command::Ctl(args) => {
            return match ember::api::client::request(&args.socket, args.action, args.dir.as_deref())
            {
                Ok(body) => {
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout.write_all(&body);
                    if !body.ends_with(b"\n") && !body.is_empty() {
                        let _ = stdout.write_all(b"\n");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ember: error: {e}");
                    ExitCode::from(1)
                }
            };
        }
    };
    match args.jail_config() {
        Ok(None) => {}
        Ok(Some(jail)) => match jail::enter(&jail, args.seccomp) {
            // The parent: the jailed monitor has ended.
            Ok(Entered::Done(code)) => return ExitCode::from(code),
            Ok(Entered::Monitor(jail)) => jail.arm(),
            Err(e) => return fail(&e),
        },
        Err(e) => return fail(&e),
    }
    if let Some(dir) = &args.restore {
        let restore = match vmm::Restore::open(dir) {
            Ok(restore) => restore,
            Err(e) => return fail(&e),
        };
        let mut config = restore.state.config.clone();
        config.console = args.console.clone().unwrap_or(ConsoleConfig::Stdio);
        config.api_socket = args.api_socket.clone();
        if let Err(e) = seccomp::configure(args.seccomp, VmShape::of(&config)) {
            return fail(&e);
        }
        return finish(vmm::restore(&config, &restore, started));
    }
    let job = match args.job_spec() {
        Ok(job) => job,
        Err(e) => return fail(&e),
    };
    let (image, scratch, cold) = (args.image.clone(), args.scratch, args.cold);
    // Bound before anything else, so that the runtime's `start` finds it as soon as it can.
    let gate = match &args.start_gate {
        Some(path) => match StartGate::bind(path, args.ready_fd) {
            Ok(gate) => Some(gate),
            Err(e) => return fail(&e),
        },
        None => None,
    };
    let seccomp_mode = args.seccomp;
    let mut config = match args.into_config() {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    // Kept until the VM is gone: the scratch disk goes with it.
    let rootfs = match Rootfs::prepare(&mut config, image.as_deref(), scratch) {
        Ok(rootfs) => rootfs,
        Err(e) => return fail(&e),
    };
    // Before any thread starts: each confines itself as it starts.
    if let Err(e) = seccomp::configure(seccomp_mode, VmShape::of(&config)) {
        return fail(&e);
    }
    let result = match job {
        Some(job) => vmm::run_job(&config, rootfs.apply(job), started, cold, gate),
        None => vmm::run(&config, started),
    };
    drop(rootfs);
    finish(result)
}

/// The exit code for how the VM ended, with a line when it did not end cleanly.
fn finish(result: Result<ember::outcome::VmOutcome, vmm::VmmError>) -> ExitCode {
    match result {
        Ok(outcome) => {
            if outcome.is_clean() {
                log::info!("{outcome}");
            } else {
                eprintln!("ember: {outcome}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => fail(&e),
    }
}

/// Help and version go to stdout as usual; a usage error is one line and exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let rendered = e.render().to_string();
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or("invalid arguments");
    let mut first = first.strip_prefix("error: ").unwrap_or(first).to_string();
    // "...were not provided:" lists the arguments on the indented lines after it.
    for more in lines.take_while(|l| l.starts_with(' ')) {
        first.push(' ');
        first.push_str(more.trim());
    }
    eprintln!("ember: error: {first} (see 'ember run --help')");
    ExitCode::from(EXIT_USAGE)
}

/// One line: the error and its causes, no backtrace.
fn fail(error: &dyn Error) -> ExitCode {
    eprintln!("ember: error: {}", error_line(error));
    ExitCode::from(EXIT_SETUP_FAILED)
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_micros()
        .init();
}
