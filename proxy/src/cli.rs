//! The `spur proxy` / `spur-proxy` command line.

use crate::log::{self, LogFormat};
use crate::Proxy;
use std::path::PathBuf;
use std::process::ExitCode;

pub const USAGE: &str = "usage: spur proxy --config FILE [--log-format json|text]

Runs the data plane from a config file (YAML or JSON, by extension or content).
SIGTERM or Ctrl-C: stop accepting, drain in-flight requests (drain_timeout), exit 0.";

#[derive(Debug, Default)]
pub struct ProxyArgs {
    pub config: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
}

/// Parses `spur proxy` arguments. Options that belong to features not built yet are refused
/// with a clear message rather than ignored.
pub fn parse_proxy_args(args: &[String]) -> Result<ProxyArgs, String> {
    let mut out = ProxyArgs::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "--config" | "-c" => out.config = Some(PathBuf::from(value("--config")?)),
            "--log-format" => {
                let v = value("--log-format")?;
                out.log_format = Some(
                    LogFormat::parse(&v)
                        .ok_or_else(|| format!("--log-format: `{v}` is not json or text"))?,
                );
            }
            "--watch" | "--control" | "--node" | "--group" | "--token-file" | "--identity"
            | "--join-token-file" => {
                return Err(format!("{flag}: not supported yet"));
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    if out.config.is_none() {
        return Err("--config FILE is required".into());
    }
    Ok(out)
}

/// Entry point of `spur proxy ARGS` and of the `spur-proxy` binary.
pub fn main(args: &[String]) -> ExitCode {
    let parsed = match parse_proxy_args(args) {
        Ok(p) => p,
        Err(msg) => {
            if msg.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("spur proxy: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    log::init(parsed.log_format);
    let path = parsed.config.expect("checked above");
    let cfg = match spur_config::load_file(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spur proxy: {} is not a valid config:\n{e}", path.display());
            return ExitCode::from(1);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let proxy = match Proxy::start(cfg).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                log::flush();
                eprintln!("spur proxy: {e}");
                return ExitCode::from(1);
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        proxy.shutdown().await;
        tracing::info!("stopped");
        log::flush();
        ExitCode::SUCCESS
    })
}

/// Completes on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_and_refuses_clearly() {
        let p = parse_proxy_args(&args(&["--config", "a.yaml", "--log-format=json"])).unwrap();
        assert_eq!(p.config.unwrap().to_str(), Some("a.yaml"));
        assert_eq!(p.log_format, Some(LogFormat::Json));
        assert_eq!(
            parse_proxy_args(&args(&[])).unwrap_err(),
            "--config FILE is required"
        );
        assert_eq!(
            parse_proxy_args(&args(&["--config"])).unwrap_err(),
            "--config needs a value"
        );
        assert_eq!(
            parse_proxy_args(&args(&["--bogus"])).unwrap_err(),
            "unknown option `--bogus`"
        );
        assert_eq!(
            parse_proxy_args(&args(&["--config", "a", "--watch"])).unwrap_err(),
            "--watch: not supported yet"
        );
    }
}
