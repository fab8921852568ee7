//! `spur-control`: the control plane binary (same as `spur control`).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
