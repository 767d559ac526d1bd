//! `kickvm`: see `kickvm run --help`.

use std::process::ExitCode;

use clap::Parser;
use kickvm::cli::{ApiArgs, Cli, Command, RunArgs};
use kickvm::config::ConsoleSpec;
use kickvm::platform::{self, Exit};
use kickvm::serial::StdinPump;
use kickvm_virtio::terminal::{Mode, RawTerminal};
use kickvm::vm;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            init_log(0);
            return usage_error(e);
        }
    };
    init_log(cli.api.verbose);
    log::debug!("kickvm {} started", env!("CARGO_PKG_VERSION"));
    let status = match cli.command {
        Some(Command::Run(args)) => run(&args),
        Some(Command::Backend(args)) => kickvm_vhost::cli::main(&args),
        None => match &cli.api.api_socket {
            Some(path) => api(path, &cli.api),
            None => {
                kickvm_virtio::note!("kickvm: say what to do: kickvm run ..., kickvm backend ... or kickvm --api-socket PATH (see kickvm --help)");
                2
            }
        },
    };
    ExitCode::from(status)
}

/// Logs to stderr; `-v` raises the default level (RUST_LOG overrides).
fn init_log(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
}

/// `kickvm --api-socket PATH`: the socket exists when this returns from
/// binding; the VM comes over it.
fn api(path: &std::path::Path, args: &ApiArgs) -> u8 {
    let listener = match kickvm::api::bind(path) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    platform::install_stop_signals();
    if let Err(e) = kickvm::sandbox::main_thread(args.seccomp) {
        return fail(e);
    }
    let host = kickvm::api::HostOptions {
        threads: args.threads,
        seccomp: args.seccomp,
        decompress_in_guest: args.decompress_in_guest,
        kvm_device: args.kvm_device.clone(),
        allow_slow_kvm: args.allow_slow_kvm,
    };
    match kickvm::api::serve(listener, path, host) {
        Ok(()) => match platform::pending_signal() {
            Some(sig) => stopped_by(sig),
            None => 0,
        },
        Err(e) => fail(e),
    }
}

/// A command line clap cannot parse: one line, like every other mistake,
/// with clap's usual status. Help and version go out as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid command line");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    kickvm_virtio::note!("kickvm: {first} (see kickvm run --help)");
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}


/// `kickvm run --no-reboot`'s status when the guest reset the machine.
const EXIT_GUEST_REBOOTED: u8 = 3;
/// ... and when a vCPU triple-faulted.
const EXIT_GUEST_TRIPLE_FAULT: u8 = 4;

fn fail(msg: impl std::fmt::Display) -> u8 {
    kickvm_virtio::note!("kickvm: {msg}");
    1
}

/// The launcher boots what it is given: the project's default guest image
/// is built and handed over by `scripts/boot.sh` (or `kickvm-rig image`).
fn default_image() -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    Err("pass --kernel (and --initrd): scripts/boot.sh builds the project's default guest image and boots it, \
         `kickvm-rig image --print-paths` prints its paths"
        .into())
}

fn run(args: &RunArgs) -> u8 {
    let cfg = match args.to_config(&default_image) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Err(e) = cfg.validate() {
        return fail(e);
    }
    let kvm = match vm::open_kvm(&cfg.kvm_device, cfg.allow_slow_kvm) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    if let Err(e) = vm::check_limits(&kvm, &cfg) {
        return fail(e);
    }
    platform::install_stop_signals();
    // The thread that builds the VM (again at each reboot) gets the
    // widest list (kickvm::sandbox); threads it starts inherit it and
    // narrow it to their own.
    if let Err(e) = kickvm::sandbox::main_thread(cfg.seccomp) {
        return fail(e);
    }

    // Stdin feeds the serial port unless virtio-console has it.
    let serial_has_stdin = cfg.console != ConsoleSpec::Stdio;
    let _raw = RawTerminal::enter(libc::STDIN_FILENO, Mode::KeepSignals).ok().flatten();
    let mut io = vm::ConsoleIo::default();
    if serial_has_stdin {
        match StdinPump::start(cfg.seccomp) {
            Ok(p) => io.stdin = Some(p),
            Err(e) => return fail(format!("cannot start the stdin thread: {e}")),
        }
    }

    match vm::run_until_stopped(&kvm, &cfg, &io, args.no_reboot, None) {
        Ok(Exit::PowerOff) => 0,
        // Not 0: a script must tell a guest that powered off from one
        // that rebooted (a kernel panic does, with `panic=1`) or crashed.
        Ok(Exit::Reset) => {
            kickvm_virtio::note!("kickvm: the guest rebooted (or its kernel panicked); exiting because of --no-reboot");
            EXIT_GUEST_REBOOTED
        }
        Ok(Exit::TripleFault) => {
            kickvm_virtio::note!("kickvm: the guest triple-faulted (the warning above says where); exiting because of --no-reboot");
            EXIT_GUEST_TRIPLE_FAULT
        }
        Ok(Exit::Signal(sig)) => stopped_by(sig),
        Ok(Exit::Error(msg)) => fail(msg),
        Err(e) => fail(e),
    }
}

fn stopped_by(sig: i32) -> u8 {
    let name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    };
    kickvm_virtio::note!("kickvm: stopped by {name}");
    (128 + sig).clamp(0, 255) as u8
}
