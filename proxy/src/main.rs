//! `spur-proxy`: the data plane binary (same as `spur proxy`).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if spur_proxy::cli::wants_help(&args) {
        spur_proxy::cli::end_quietly_on_closed_output();
    }
    spur_proxy::cli::main(&args)
}
