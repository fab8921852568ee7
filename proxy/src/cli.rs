//! The `spur proxy` / `spur-proxy` command line.

use crate::log::{self, LogFormat};
use crate::tls::{Credential, Identity, WorkloadIdentity};
use crate::{reload, upgrade, Proxy};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub const USAGE: &str = "usage: spur proxy --config FILE [--watch] [--admin ADDR] [--log-format json|text]
                  [--upgrade] [--upgrade-socket PATH]
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
SIGTERM or Ctrl-C: stop accepting, drain in-flight requests (drain_timeout), exit 0.
--upgrade: take over the listening sockets of the proxy running with the same upgrade
socket, become ready, then that one drains and exits 0. Every proxy listens on its upgrade
socket (mode 0600): --upgrade-socket PATH, by default $XDG_RUNTIME_DIR/spur-<admin port>.sock,
else /tmp/spur-<admin port>.sock (none without an admin port other than 0).";

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
    pub upgrade: bool,
    pub upgrade_socket: Option<PathBuf>,
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
            "--upgrade" => out.upgrade = true,
            "--upgrade-socket" => {
                out.upgrade_socket = Some(PathBuf::from(value("--upgrade-socket")?))
            }
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

/// A command that prints and ends (help texts, validate, inject, ...) is ended by SIGPIPE
/// when the reader of its output goes away (`spur inject app.yaml | head`), as Unix tools
/// are, instead of panicking on the failed write. Rust ignores SIGPIPE by default; a
/// long-running proxy keeps that, so a closed log pipe never stops its traffic (socket
/// writes never raise SIGPIPE: std sends with MSG_NOSIGNAL).
pub fn end_quietly_on_closed_output() {
    #[cfg(unix)]
    // SAFETY: sets the action of one signal to its default; no handler runs our code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Prints a command's help text (see [`end_quietly_on_closed_output`]).
pub fn print_help(text: &str) {
    end_quietly_on_closed_output();
    println!("{text}");
}

/// Entry point of `spur proxy ARGS` and of the `spur-proxy` binary.
pub fn main(args: &[String]) -> ExitCode {
    let parsed = match parse_proxy_args(args) {
        Ok(p) => p,
        Err(msg) => {
            if msg.is_empty() {
                print_help(USAGE);
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
    let upgrade_path = match upgrade_path(&parsed, bootstrap.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("spur proxy: {e}");
            return ExitCode::from(2);
        }
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
        // Upgrading: the running proxy's sockets first, so that the config takes them.
        let takeover = match (&upgrade_path, parsed.upgrade) {
            (Some(path), true) => match upgrade::take_over(path).await {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "cannot upgrade");
                    log::flush();
                    eprintln!("spur proxy: --upgrade: {e}");
                    return ExitCode::from(1);
                }
            },
            _ => None,
        };
        let (takeover, inherited) = takeover.unzip();
        let caches = workers.clone();
        let started = async {
            let proxy = Proxy::idle_on(workers)?;
            if let Some(inherited) = inherited {
                proxy.inherit(inherited).await;
            }
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
            Ok(p) => {
                caches.keep_freed_blocks();
                Arc::new(p)
            }
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
        let explicit = parsed.upgrade_socket.is_some();
        let upgrade = (upgrade_path, takeover, explicit);
        run_until_stopped(proxy, source, upgrade).await
    })
}

/// Serves until SIGTERM/Ctrl-C, or until a new process has taken over (`--upgrade`), then
/// drains. When upgrading, this process tells the old one to drain once it is ready.
async fn run_until_stopped(
    proxy: Arc<Proxy>,
    source: tokio::task::JoinHandle<()>,
    (upgrade_path, takeover, explicit): (Option<PathBuf>, Option<upgrade::Takeover>, bool),
) -> ExitCode {
    let socket = tokio::select! {
        s = upgrade_socket(&proxy, upgrade_path, takeover, explicit) => s,
        _ = wait_for_signal() => Err(String::new()),
    };
    let mut upgraded = match socket {
        Ok(u) => u,
        Err(e) => {
            source.abort();
            if !e.is_empty() {
                tracing::error!(error = %e, "cannot start");
                eprintln!("spur proxy: {e}");
            }
            proxy.shutdown().await;
            log::flush();
            return ExitCode::from(if e.is_empty() { 0 } else { 1 });
        }
    };
    let by_upgrade = tokio::select! {
        _ = wait_for_signal() => false,
        _ = async {
            match upgraded.as_mut() {
                Some(u) => u.wait().await,
                None => std::future::pending().await,
            }
        } => true,
    };
    // No config may arrive while draining.
    source.abort();
    if by_upgrade {
        tracing::info!("upgraded: the new process accepts; draining in-flight requests");
        proxy.shutdown_for_upgrade().await;
    } else {
        tracing::info!("shutting down: draining in-flight requests");
        proxy.shutdown().await;
        if let Some(u) = &upgraded {
            u.remove_path();
        }
    }
    tracing::info!("stopped");
    log::flush();
    ExitCode::SUCCESS
}

/// Where this proxy's upgrade socket is: `--upgrade-socket`, else the default for its admin
/// port (`None` without one, or with port 0: a new process could not know it).
fn upgrade_path(
    parsed: &ProxyArgs,
    bootstrap: Option<&spur_config::Config>,
) -> Result<Option<PathBuf>, String> {
    if let Some(p) = &parsed.upgrade_socket {
        return Ok(Some(p.clone()));
    }
    let port = match &parsed.admin {
        Some(a) => a.parse::<std::net::SocketAddr>().ok().map(|a| a.port()),
        None => bootstrap
            .and_then(|c| c.admin.as_ref())
            .map(|a| a.listen.port()),
    };
    match port.filter(|p| *p != 0) {
        Some(p) => Ok(Some(upgrade::default_path(p))),
        None if parsed.upgrade => Err("--upgrade needs the running proxy's upgrade socket: \
             give --upgrade-socket PATH (the default, spur-<admin port>.sock, needs an admin \
             address with a port other than 0)"
            .into()),
        None => Ok(None),
    }
}

/// How long an upgrading proxy may take to become ready (its first config may come from
/// the control plane) before it gives up and leaves the old one serving.
const UPGRADE_READY_LIMIT: Duration = Duration::from_secs(110);

/// Listens on the upgrade socket. When upgrading, first waits until this proxy is ready,
/// then tells the old one to drain and takes over its socket's path. A failure to listen is
/// fatal only when the path was given (`explicit`) and nothing was taken over: the default
/// may be unwritable (a read-only root filesystem), which costs upgrades, not service.
async fn upgrade_socket(
    proxy: &Arc<Proxy>,
    path: Option<PathBuf>,
    takeover: Option<upgrade::Takeover>,
    explicit: bool,
) -> Result<Option<upgrade::Upgraded>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    let replace = takeover.is_some();
    if let Some(takeover) = takeover {
        let deadline = tokio::time::Instant::now() + UPGRADE_READY_LIMIT;
        while !proxy
            .shared
            .ready
            .load(std::sync::atomic::Ordering::Acquire)
        {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !proxy
            .shared
            .ready
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(format!(
                "--upgrade: not ready within {UPGRADE_READY_LIMIT:?}; the running proxy (pid {}) carries on",
                takeover.pid
            ));
        }
        let old = takeover.pid;
        takeover
            .finish()
            .await
            .map_err(|e| format!("--upgrade: {e}"))?;
        proxy.forget_inherited().await;
        tracing::info!(old_pid = old, "upgrade: ready; the old process drains");
    }
    match upgrade::listen(&path, replace) {
        Ok(sock) => Ok(Some(upgrade::serve(proxy.clone(), sock))),
        // Once the old process drains, this one must serve whatever happens here.
        Err(e) if explicit && !replace => Err(e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "no upgrade socket: this proxy cannot be upgraded in place");
            Ok(None)
        }
    }
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
    fn the_upgrade_socket_comes_from_the_flag_or_the_admin_port() {
        let p = parse_proxy_args(&args(&["--config", "a", "--upgrade"])).unwrap();
        assert!(p.upgrade);
        // No admin port to name the default path after: --upgrade cannot find its socket.
        let err = upgrade_path(&p, None).unwrap_err();
        assert!(err.contains("give --upgrade-socket PATH"), "{err}");
        let plain = parse_proxy_args(&args(&["--config", "a"])).unwrap();
        assert_eq!(upgrade_path(&plain, None).unwrap(), None);
        let pinned = parse_proxy_args(&args(&["--config", "a", "--admin", "127.0.0.1:9901"]));
        let path = upgrade_path(&pinned.unwrap(), None).unwrap().unwrap();
        assert!(path.ends_with("spur-9901.sock"), "{path:?}");
        let cfg = spur_config::load("admin: { listen: \"0.0.0.0:9902\" }\n", None).unwrap();
        let path = upgrade_path(&p, Some(&cfg)).unwrap().unwrap();
        assert!(path.ends_with("spur-9902.sock"), "{path:?}");
        let given = parse_proxy_args(&args(&["--config", "a", "--upgrade-socket=/run/s.sock"]));
        assert_eq!(
            upgrade_path(&given.unwrap(), None).unwrap(),
            Some(PathBuf::from("/run/s.sock"))
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
