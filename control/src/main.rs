//! `spur-control`: the control plane binary (same as `spur control`).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        // Help ends quietly when its reader goes away (see spur_proxy::cli's
        // end_quietly_on_closed_output); the server keeps SIGPIPE ignored.
        #[cfg(unix)]
        // SAFETY: sets the action of one signal to its default; no handler runs our code.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    spur_control::cli::main(&args, |format| {
        let json = match format {
            Some("json") => true,
            Some("text") => false,
            _ => !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let builder = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("SPUR_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr);
        if json {
            builder.json().flatten_event(true).init();
        } else {
            builder.init();
        }
    })
}
