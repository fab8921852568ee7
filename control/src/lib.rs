//! spur-control: the control plane. Its API (configs per group, history, watch streams)
//! is the subject of the control-plane issue; until it lands, the command says so.

pub mod cli {
    use std::process::ExitCode;

    /// Entry point of `spur control` and of the `spur-control` binary.
    pub fn main(_args: &[String]) -> ExitCode {
        eprintln!(
            "spur control: not supported yet (run the proxy from a file: spur proxy --config FILE)"
        );
        ExitCode::from(2)
    }
}
