//! `spur-proxy`: the data plane binary (same as `spur proxy`).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    spur_proxy::cli::main(&args)
}
