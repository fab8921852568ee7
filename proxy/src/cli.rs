//! The `spur proxy` / `spur-proxy` command line.

use crate::log::{self, LogFormat};
use crate::tls::{Credential, Identity, WorkloadIdentity};
use crate::{reload, Proxy};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub const USAGE: &str = "usage: spur proxy --config FILE [--watch] [--admin ADDR] [--log-format json|text]
       spur proxy --control URL --node NAME --group GROUP [--token-file F] [--config FILE] [--admin ADDR]
                  [--control-ca FILE] [--sa-token-file PATH | --identity spiffe://TD/PATH --join-token-file F]

Runs the data plane, from a config file (YAML or JSON, by extension or content; reloaded
on SIGHUP, and when it changes with --watch) or from the control plane at URL (FILE is
then a bootstrap used until the first push; an https:// URL is verified against the CA in
--control-ca FILE, else the system CA bundle). --admin starts the admin server at once, at
ADDR, whatever the configs say (so probes work before the first config arrives).
A workload certificate from the control plane's mesh CA, obtained before any config is
applied and renewed at two thirds of its life (tls blocks that name no files use it):
  --sa-token-file PATH  Kubernetes: the pod's projected service account token (audience
                        spur) proves the identity, spiffe://TD/ns/NS/sa/SA; the file is
                        read again at each renewal, as the kubelet rotates it
  --identity ID --join-token-file F
                        that SPIFFE ID, with a join token the CA binds to it
--token-file F holds the control API's bearer token.
SIGTERM or Ctrl-C: stop accepting, drain in-flight requests (drain_timeout), exit 0.";

#[derive(Debug, Default)]
pub struct ProxyArgs {
    pub config: Option<PathBuf>,
    pub watch: bool,
    pub control: Option<String>,
    pub node: Option<String>,
    pub group: Option<String>,
    pub token_file: Option<PathBuf>,
    pub admin: Option<String>,
    pub log_format: Option<LogFormat>,
    pub identity: Option<Identity>,
    pub join_token_file: Option<PathBuf>,
    pub sa_token_file: Option<PathBuf>,
    pub control_ca: Option<PathBuf>,
}

/// How long the proxy keeps trying an unreachable mesh CA at start before giving up.
pub const CERTIFY_START_LIMIT: Duration = Duration::from_secs(30);

/// Parses `spur proxy` arguments. Options that belong to features not built yet are refused
/// with a clear message rather than ignored.
pub fn parse_proxy_args(args: &[String]) -> Result<ProxyArgs, String> {
    let mut out = ProxyArgs::default();
    let mut flags = spur_config::args::Flags::new(args);
    while let Some(flag) = flags.next_flag() {
        let mut value = |name: &str| flags.value(name);
        match flag {
            "--config" | "-c" => out.config = Some(PathBuf::from(value("--config")?)),
            "--log-format" => {
                let v = value("--log-format")?;
                out.log_format = Some(
                    LogFormat::parse(&v)
                        .ok_or_else(|| format!("--log-format: `{v}` is not json or text"))?,
                );
            }
            "--watch" => out.watch = true,
            "--admin" => {
                let v = value("--admin")?;
                if v.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "--admin: `{v}` is not an address like 127.0.0.1:9901"
                    ));
                }
                out.admin = Some(v);
            }
            "--control" => {
                out.control = Some(value("--control")?.trim_end_matches('/').to_string())
            }
            "--node" => out.node = Some(value("--node")?),
            "--group" => out.group = Some(value("--group")?),
            "--token-file" => out.token_file = Some(PathBuf::from(value("--token-file")?)),
            "--control-ca" => out.control_ca = Some(PathBuf::from(value("--control-ca")?)),
            "--identity" => {
                let v = value("--identity")?;
                out.identity = Some(Identity::parse(&v).map_err(|e| format!("--identity: {e}"))?);
            }
            "--join-token-file" => {
                out.join_token_file = Some(PathBuf::from(value("--join-token-file")?))
            }
            "--sa-token-file" => out.sa_token_file = Some(PathBuf::from(value("--sa-token-file")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    check_identity(&out)?;
    match &out.control {
        None => {
            if out.config.is_none() {
                return Err("--config FILE (or --control URL) is required".into());
            }
            for (set, name) in [
                (out.node.is_some(), "--node"),
                (out.group.is_some(), "--group"),
                (out.token_file.is_some(), "--token-file"),
                (out.control_ca.is_some(), "--control-ca"),
            ] {
                if set {
                    return Err(format!("{name} goes with --control"));
                }
            }
        }
        Some(url) => {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(format!(
                    "--control: `{url}` is not an http:// or https:// URL"
                ));
            }
            if out.control_ca.is_some() && !url.starts_with("https://") {
                return Err("--control-ca goes with an https:// control URL".into());
            }
            if out.node.is_none() || out.group.is_none() {
                return Err("--control needs --node NAME and --group GROUP".into());
            }
            if out.watch {
                return Err(
                    "--watch is for file mode; with --control the control plane pushes changes"
                        .into(),
                );
            }
        }
    }
    Ok(out)
}

/// The identity options: a service-account token file, or an identity with a join token;
/// either needs the control plane, which is the mesh CA.
fn check_identity(out: &ProxyArgs) -> Result<(), String> {
    let wants = out.identity.is_some() || out.sa_token_file.is_some();
    if wants && out.control.is_none() {
        let flag = if out.sa_token_file.is_some() {
            "--sa-token-file"
        } else {
            "--identity"
        };
        return Err(format!(
            "{flag} needs --control URL: the control plane is the mesh CA"
        ));
    }
    match (&out.identity, &out.join_token_file, &out.sa_token_file) {
        (_, Some(_), Some(_)) => Err(
            "--join-token-file and --sa-token-file are two ways to prove the identity: give one"
                .into(),
        ),
        (Some(_), None, None) => {
            Err("--identity needs --join-token-file F (or --sa-token-file PATH)".into())
        }
        (None, Some(_), None) => Err("--join-token-file goes with --identity".into()),
        _ => Ok(()),
    }
}

/// What proves the identity to the mesh CA, and the identity asked for (`None`: the one
/// the service account proves); `None` without identity options.
fn credential(
    parsed: &ProxyArgs,
) -> Result<Option<(Credential, Option<crate::tls::Identity>)>, String> {
    if let Some(path) = &parsed.sa_token_file {
        // Read once now, so a missing file fails at start rather than at the CA.
        spur_config::read_token_file(path).map_err(|e| format!("--sa-token-file: {e}"))?;
        return Ok(Some((
            Credential::ServiceAccountTokenFile(path.clone()),
            parsed.identity.clone(),
        )));
    }
    match (&parsed.identity, &parsed.join_token_file) {
        (Some(id), Some(f)) => {
            let token = spur_config::read_token_file(f)?;
            Ok(Some((Credential::JoinToken(token), Some(id.clone()))))
        }
        _ => Ok(None),
    }
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
    let bootstrap = match &parsed.config {
        Some(path) => match spur_config::load_file(path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("spur proxy: {} is not a valid config:\n{e}", path.display());
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let token = match parsed
        .token_file
        .as_deref()
        .map(spur_config::read_token_file)
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("spur proxy: {e}");
            return ExitCode::from(1);
        }
    };
    let control_client = match &parsed.control {
        Some(_) => match crate::control_client::client(parsed.control_ca.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("spur proxy: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    // Thread per core: one single-threaded runtime per worker (see `crate::workers`).
    let wanted = crate::workers::wanted(bootstrap.as_ref().and_then(|c| c.workers));
    let (rt, workers) = match crate::workers::start(wanted) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("spur proxy: cannot start {wanted} worker thread(s): {e}");
            return ExitCode::from(1);
        }
    };
    let credential = match credential(&parsed) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spur proxy: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        // The certificate first: configs may name no TLS files and need it.
        let identity = match (credential, &parsed.control) {
            (Some((credential, want)), Some(url)) => {
                match WorkloadIdentity::obtain_as_with_retry(
                    control_client.clone().expect("made with --control"),
                    url,
                    want,
                    credential,
                    CERTIFY_START_LIMIT,
                )
                .await
                {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::error!(error = %e, "no workload certificate: cannot start");
                        log::flush();
                        eprintln!("spur proxy: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            _ => None,
        };
        tracing::info!(workers = workers.len(), "workers started");
        let started = async {
            let proxy = Proxy::idle_on(workers)?;
            if let Some(w) = identity {
                let _ = proxy.set_identity(w);
            }
            if let Some(addr) = &parsed.admin {
                proxy.pin_admin(addr).await?;
            }
            if let Some(cfg) = bootstrap {
                proxy.apply(cfg, 0).await?;
            }
            Ok::<_, crate::ApplyError>(proxy)
        }
        .await;
        let proxy = match started {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                log::flush();
                eprintln!("spur proxy: {e}");
                return ExitCode::from(1);
            }
        };
        let source = match parsed.control {
            Some(url) => {
                let src = reload::ControlSource {
                    url,
                    client: control_client.expect("made with --control"),
                    node: parsed.node.expect("checked"),
                    group: parsed.group.expect("checked"),
                    token,
                };
                reload::spawn_control(proxy.clone(), src)
            }
            None => {
                reload::spawn_file(proxy.clone(), parsed.config.expect("checked"), parsed.watch)
            }
        };
        wait_for_signal().await;
        // No config may arrive while draining.
        source.abort();
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
            "--config FILE (or --control URL) is required"
        );
        assert_eq!(
            parse_proxy_args(&args(&["--config"])).unwrap_err(),
            "--config needs a value"
        );
        assert_eq!(
            parse_proxy_args(&args(&["--bogus"])).unwrap_err(),
            "unknown option `--bogus`"
        );
        assert!(
            parse_proxy_args(&args(&["--config", "a", "--watch"]))
                .unwrap()
                .watch
        );
        assert_eq!(
            parse_proxy_args(&args(&["--control", "http://c:7070", "--node", "n"])).unwrap_err(),
            "--control needs --node NAME and --group GROUP"
        );
        let c = parse_proxy_args(&args(&[
            "--control",
            "http://c:7070/",
            "--node",
            "n",
            "--group",
            "g",
        ]))
        .unwrap();
        assert_eq!(c.control.as_deref(), Some("http://c:7070"));
        assert_eq!(
            parse_proxy_args(&args(&["--config", "a", "--group", "g"])).unwrap_err(),
            "--group goes with --control"
        );
    }

    #[test]
    fn identity_needs_the_control_plane_and_a_join_token() {
        let base = ["--control", "http://c:7070", "--node", "n", "--group", "g"];
        let with = |extra: &[&str]| {
            let mut a: Vec<&str> = base.to_vec();
            a.extend_from_slice(extra);
            parse_proxy_args(&args(&a))
        };
        let ok = with(&[
            "--identity",
            "spiffe://td/ns/x/sa/y",
            "--join-token-file",
            "t",
        ])
        .unwrap();
        assert_eq!(ok.identity.unwrap().as_str(), "spiffe://td/ns/x/sa/y");
        assert!(with(&["--identity", "web", "--join-token-file", "t"])
            .unwrap_err()
            .starts_with("--identity: `web` is not a SPIFFE ID"));
        assert_eq!(
            with(&["--identity", "spiffe://td/a"]).unwrap_err(),
            "--identity needs --join-token-file F (or --sa-token-file PATH)"
        );
        assert!(with(&["--sa-token-file", "t"]).unwrap().identity.is_none());
        assert!(with(&["--sa-token-file", "t", "--identity", "spiffe://td/a"]).is_ok());
        assert!(with(&["--sa-token-file", "t", "--join-token-file", "j"])
            .unwrap_err()
            .contains("give one"));
        assert_eq!(
            parse_proxy_args(&args(&["--config", "a", "--sa-token-file", "t"])).unwrap_err(),
            "--sa-token-file needs --control URL: the control plane is the mesh CA"
        );
        assert_eq!(
            with(&["--join-token-file", "t"]).unwrap_err(),
            "--join-token-file goes with --identity"
        );
        assert_eq!(
            parse_proxy_args(&args(&[
                "--config",
                "a",
                "--identity",
                "spiffe://td/a",
                "--join-token-file",
                "t"
            ]))
            .unwrap_err(),
            "--identity needs --control URL: the control plane is the mesh CA"
        );
    }
}
