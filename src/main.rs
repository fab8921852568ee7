//! `spur`: the umbrella command. `spur proxy`, `spur control`, `spur validate`, `spur demo`.

mod authz;
mod demo;
mod explain;
mod inject;
mod iptables;
mod live;
mod rollout;

use std::process::ExitCode;

const USAGE: &str = "Spur: a service-mesh sidecar proxy

usage: spur <command> [options]

commands:
  demo                       run a proxy with two echo backends and a canary split, in one process
  proxy --config FILE        run the data plane from a config file
  validate [--kubernetes] FILE
                             check a config file: every error with its field path
  control                    run the control plane (configs per group, watched by proxies)
  inject FILE|-              add the Spur sidecar to the workloads of Kubernetes manifests
  init-iptables [--dry-run]  redirect a pod's TCP through its proxy (the sidecar's init step)
  authz explain FILE --listener L [...]
                             which authorization rule decides a request, and why
  top --control URL --group G
                             a group's live traffic per route and cluster, in a terminal
  tap --control URL --group G [--route R] [--status 5xx]
                             a group's sampled requests as JSON lines
  explain --control URL --pod NS/POD URL
                             what a meshed pod's sidecar would do with a request (--mesh)
  rollout status|start|pause|resume|abort --control URL --group G NAME
                             drive a canary rollout and show its verdicts
  help [COMMAND]             this text, or a command's options

Run `spur <command> --help` (or `spur help <command>`) for a command's options.";

/// glibc's allocator with a cache of freed blocks on each proxy worker (see
/// `spur_proxy::alloc`).
#[global_allocator]
static ALLOC: spur_proxy::alloc::ThreadCache = spur_proxy::alloc::ThreadCache;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    // Commands that print and end stop quietly when their reader goes away. The others keep
    // Rust's default, SIGPIPE ignored: the servers (a closed log pipe never stops traffic),
    // init-iptables (iptables-restore may exit before reading: its error is reported), and
    // top and tap (they end on a failed write themselves). Their help texts set it.
    if matches!(
        cmd.as_str(),
        "validate"
            | "inject"
            | "authz"
            | "explain"
            | "rollout"
            | "help"
            | "-h"
            | "--help"
            | "version"
            | "--version"
    ) {
        spur_proxy::cli::end_quietly_on_closed_output();
    }
    run(cmd, rest)
}

fn run(cmd: &str, rest: &[String]) -> ExitCode {
    match cmd {
        "proxy" => spur_proxy::cli::main(rest),
        "control" => spur_control::cli::main(rest, |format| {
            spur_proxy::log::init(format.and_then(spur_proxy::log::LogFormat::parse))
        }),
        "validate" => validate(rest),
        "demo" => demo::main(rest),
        "inject" => inject::main(rest),
        "init-iptables" => iptables::main(rest),
        "authz" => authz::main(rest),
        "top" => live::top(rest),
        "tap" => live::tap(rest),
        "explain" => explain::main(rest),
        "rollout" => rollout::main(rest),
        "help" | "-h" | "--help" => match rest {
            [command] if command != "help" => run(command, &["--help".to_string()]),
            [] => {
                println!("{USAGE}");
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!("usage: spur help [COMMAND]\n\n{USAGE}");
                ExitCode::from(2)
            }
        },
        "--version" | "version" => {
            println!("spur {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("spur: unknown command `{other}`\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// A command's parsed arguments, or how the command ends: `--help` (an empty error from the
/// parser) prints the usage and succeeds; a bad argument prints the error and the usage,
/// exit 2.
fn args_or_exit<A>(command: &str, usage: &str, parsed: Result<A, String>) -> Result<A, ExitCode> {
    match parsed {
        Ok(a) => Ok(a),
        Err(e) if e.is_empty() => {
            spur_proxy::cli::print_help(usage);
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("spur {command}: {e}\n\n{usage}");
            Err(ExitCode::from(2))
        }
    }
}

/// The one-thread runtime a client command (top, tap, explain, rollout) runs on.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

const VALIDATE_USAGE: &str = "usage: spur validate [--kubernetes] FILE

Checks a config as a proxy would: exit 0 and a one-line summary, or exit 1 and every error
with its field path. With --kubernetes, as `spur control --kubernetes` would: `k8s:` clusters
are accepted (a proxy given one directly refuses it; the control plane resolves them).";

/// `spur validate [--kubernetes] FILE`: exit 0 and a one-line summary, or exit 1 and every
/// error.
fn validate(args: &[String]) -> ExitCode {
    let (rules, file) = match args {
        [flag, file] if flag == "--kubernetes" => (
            spur_config::Rules {
                k8s_discovery: true,
                ..Default::default()
            },
            file,
        ),
        [flag] if flag == "-h" || flag == "--help" => {
            println!("{VALIDATE_USAGE}");
            return ExitCode::SUCCESS;
        }
        [file] if !file.starts_with("--") => (spur_config::Rules::default(), file),
        _ => {
            eprintln!("{VALIDATE_USAGE}");
            return ExitCode::from(2);
        }
    };
    match spur_config::load_file_with(std::path::Path::new(file), rules) {
        Ok(cfg) => {
            println!("{file}: {}", spur_config::summary(&cfg));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{file}: {} error(s)", e.errors.len());
            for err in &e.errors {
                eprintln!("  {err}");
            }
            ExitCode::from(1)
        }
    }
}
