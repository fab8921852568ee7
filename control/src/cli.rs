//! The `spur control` / `spur-control` command line.

use std::path::PathBuf;
use std::process::ExitCode;

pub const USAGE: &str = "usage: spur control [--listen ADDR] [--token-file FILE | --insecure-no-token]
                    [--store dir [--data-dir DIR] | --store kubernetes [--namespace NS] [--lease-duration 15s]]
                    [--log-format json|text] [--max-connections N] [--forget-proxies-after 1h]
                    [--ca-dir DIR | --mesh-ca] [--join-tokens FILE] [--join-token-file FILE] [--trust-domain D] [--cert-ttl 24h]
                    [--kubernetes [--kubeconfig PATH] [--mesh [--mesh-namespaces a,b]]]
                    [--tls-cert FILE --tls-key FILE]

Runs the control plane: configs per group, history, rollback, watch streams for proxies.
Defaults: --listen 127.0.0.1:7070, --store dir, --data-dir ./spur-data.

--store dir           configs, versions and history in files under --data-dir: one process.
--store kubernetes    in the cluster, as ConfigMaps in --namespace NS (default: the
                      kubeconfig's namespace, or the pod's), watched by every replica: several
                      replicas may run at once behind one Service. The leader (Lease
                      spur-control in NS, --lease-duration, default 15s) renders discovery and
                      trims history; any replica answers reads, watches, writes and certify.
                      --kubeconfig PATH as for --kubernetes.

--token-file FILE     every /v1/ call needs `Authorization: Bearer <the file's content>`.
                      Make one with: head -c 32 /dev/urandom | base64 > FILE
                      Required to listen on an address other hosts can reach, unless
                      --insecure-no-token says that an open API is meant.
--max-connections N   connections to the API at once (default 10000); more are closed.
--forget-proxies-after D
                      GET /v1/proxies forgets a proxy with no open watch stream after D
                      without a word from it (default 1h).
--ca-dir DIR          the control plane is the mesh CA: POST /v1/identity/certify signs
                      workload certificates (SPIFFE IDs of --trust-domain, default
                      cluster.local; lifetime --cert-ttl, default 24h) for proxies that
                      prove who they are with one of:
  --join-tokens FILE  lines `TOKEN PATTERN`: a token obtains only the identities its
                      pattern covers (a SPIFFE ID, or a prefix ending in /*)
  --join-token-file F one token that obtains any identity of the trust domain (a warning
                      at start says so; prefer --join-tokens)
  --kubernetes        a projected service account token (audience spur), checked with
                      the TokenReview API: the identity is spiffe://TD/ns/NS/sa/SA
--kubernetes          also: clusters written `k8s: name.namespace:port` get the ready
                      endpoints of that Service from its EndpointSlices, watched through the
                      Kubernetes API (--kubeconfig PATH; without it KUBECONFIG or
                      ~/.kube/config if present, else the pod's service account); each change
                      is pushed to the proxies as a new version.
--mesh-ca             with --store kubernetes: the control plane is the mesh CA (as with
                      --ca-dir), its key and certificate in the Secret spur-mesh-ca in NS,
                      made by the first replica and shared by all.
--mesh                with --kubernetes: every group's config is rendered from the cluster
                      (Services, EndpointSlices, Pods, HTTPRoute and GRPCRoute objects
                      whose parent is a Service), the group's own config merged over it;
                      see docs/kubernetes.md. --mesh-namespaces a,b limits it to those
                      namespaces (default: all).
--tls-cert, --tls-key PEM files (re-read when they change): the API is served over HTTPS
                      only; proxies use --control https://HOST:PORT and, for a private CA,
                      --control-ca FILE.";

#[derive(Debug)]
pub struct ControlArgs {
    pub listen: std::net::SocketAddr,
    pub data_dir: PathBuf,
    data_dir_given: bool,
    /// `--store kubernetes`.
    pub kube_store: bool,
    pub namespace: Option<String>,
    pub lease_duration: std::time::Duration,
    pub mesh_ca: bool,
    pub token_file: Option<PathBuf>,
    pub insecure_no_token: bool,
    pub log_format: Option<String>,
    pub max_connections: usize,
    pub forget_proxies_after: std::time::Duration,
    pub ca_dir: Option<PathBuf>,
    pub join_tokens: Option<PathBuf>,
    pub join_token_file: Option<PathBuf>,
    pub trust_domain: String,
    pub cert_ttl: std::time::Duration,
    pub kubernetes: bool,
    pub kubeconfig: Option<PathBuf>,
    pub mesh: bool,
    pub mesh_namespaces: Option<std::collections::BTreeSet<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

fn duration(
    flag: &str,
    v: &str,
    at_least: std::time::Duration,
) -> Result<std::time::Duration, String> {
    let d: spur_config::Duration = v.parse().map_err(|e| format!("{flag}: {e}"))?;
    if d.get() < at_least {
        return Err(format!("{flag}: at least {}s", at_least.as_secs()));
    }
    Ok(d.get())
}

pub fn parse(args: &[String]) -> Result<ControlArgs, String> {
    let mut out = ControlArgs {
        listen: "127.0.0.1:7070".parse().expect("default address"),
        data_dir: PathBuf::from("spur-data"),
        data_dir_given: false,
        kube_store: false,
        namespace: None,
        lease_duration: crate::leader::DEFAULT_LEASE,
        mesh_ca: false,
        token_file: None,
        insecure_no_token: false,
        log_format: None,
        max_connections: crate::serve::Limits::default().max_connections,
        forget_proxies_after: crate::proxies::DEFAULT_FORGET_AFTER,
        ca_dir: None,
        join_tokens: None,
        join_token_file: None,
        trust_domain: "cluster.local".into(),
        cert_ttl: std::time::Duration::from_secs(24 * 3600),
        kubernetes: false,
        kubeconfig: None,
        mesh: false,
        mesh_namespaces: None,
        tls_cert: None,
        tls_key: None,
    };
    let mut flags = spur_config::args::Flags::new(args);
    while let Some(flag) = flags.next_flag() {
        let mut value = |name: &str| flags.value(name);
        match flag {
            "--listen" => {
                let v = value("--listen")?;
                out.listen = v.parse().map_err(|_| {
                    format!("--listen: `{v}` is not an address like 127.0.0.1:7070")
                })?;
            }
            "--data-dir" => {
                out.data_dir = PathBuf::from(value("--data-dir")?);
                out.data_dir_given = true;
            }
            "--store" => {
                out.kube_store = match value("--store")?.as_str() {
                    "dir" => false,
                    "kubernetes" => true,
                    other => return Err(format!("--store: `{other}` is not dir or kubernetes")),
                }
            }
            "--namespace" => out.namespace = Some(value("--namespace")?),
            "--lease-duration" => {
                let v = value("--lease-duration")?;
                out.lease_duration =
                    duration("--lease-duration", &v, std::time::Duration::from_secs(1))?;
            }
            "--mesh-ca" => out.mesh_ca = true,
            "--token-file" => out.token_file = Some(PathBuf::from(value("--token-file")?)),
            "--insecure-no-token" => out.insecure_no_token = true,
            "--log-format" => out.log_format = Some(value("--log-format")?),
            "--max-connections" => {
                let v = value("--max-connections")?;
                out.max_connections =
                    v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("--max-connections: `{v}` is not a positive number")
                    })?;
            }
            "--forget-proxies-after" => {
                let v = value("--forget-proxies-after")?;
                out.forget_proxies_after = duration(
                    "--forget-proxies-after",
                    &v,
                    std::time::Duration::from_secs(60),
                )?;
            }
            "--ca-dir" => out.ca_dir = Some(PathBuf::from(value("--ca-dir")?)),
            "--join-tokens" => out.join_tokens = Some(PathBuf::from(value("--join-tokens")?)),
            "--join-token-file" => {
                out.join_token_file = Some(PathBuf::from(value("--join-token-file")?))
            }
            "--trust-domain" => {
                let v = value("--trust-domain")?;
                spur_config::SpiffeId::parse(&format!("spiffe://{v}"))
                    .map_err(|_| format!("--trust-domain: `{v}` is not a trust domain (lowercase letters, digits, ., -, _)"))?;
                out.trust_domain = v;
            }
            "--cert-ttl" => {
                let v = value("--cert-ttl")?;
                out.cert_ttl = duration("--cert-ttl", &v, std::time::Duration::from_secs(60))?;
            }
            "--kubernetes" => out.kubernetes = true,
            "--kubeconfig" => out.kubeconfig = Some(PathBuf::from(value("--kubeconfig")?)),
            "--mesh" => out.mesh = true,
            "--mesh-namespaces" => {
                let v = value("--mesh-namespaces")?;
                let names: std::collections::BTreeSet<String> = v
                    .split(',')
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect();
                if names.is_empty() {
                    return Err("--mesh-namespaces: name at least one namespace".into());
                }
                out.mesh_namespaces = Some(names);
            }
            "--tls-cert" => out.tls_cert = Some(PathBuf::from(value("--tls-cert")?)),
            "--tls-key" => out.tls_key = Some(PathBuf::from(value("--tls-key")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    check(&out)?;
    Ok(out)
}

/// Options that only make sense together, and the open API refused.
fn check(out: &ControlArgs) -> Result<(), String> {
    check_store(out)?;
    let proves = out.join_tokens.is_some() || out.join_token_file.is_some() || out.kubernetes;
    let ca = out.ca_dir.is_some() || out.mesh_ca;
    let flag = if out.mesh_ca { "--mesh-ca" } else { "--ca-dir" };
    match (ca, proves) {
        (true, false) => {
            return Err(format!("{flag} needs a way for proxies to prove who they are: --join-tokens FILE, --join-token-file F, or --kubernetes"))
        }
        (false, _) if out.join_tokens.is_some() || out.join_token_file.is_some() => {
            return Err("--join-tokens and --join-token-file go with --ca-dir DIR (or --mesh-ca with --store kubernetes)".into())
        }
        _ => {}
    }
    if out.tls_cert.is_some() != out.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    if out.kubeconfig.is_some() && !out.kubernetes && !out.kube_store {
        return Err("--kubeconfig only applies with --kubernetes or --store kubernetes".into());
    }
    if out.mesh && !out.kubernetes {
        return Err("--mesh needs --kubernetes (the mesh is rendered from the cluster)".into());
    }
    if out.mesh_namespaces.is_some() && !out.mesh {
        return Err("--mesh-namespaces only applies with --mesh".into());
    }
    if out.token_file.is_some() && out.insecure_no_token {
        return Err("--token-file and --insecure-no-token contradict each other".into());
    }
    if out.token_file.is_none() && !out.insecure_no_token && !out.listen.ip().is_loopback() {
        return Err(format!(
            "--listen {}: other hosts can reach this address, and without --token-file anyone \
             who can may change every group's config. Give --token-file FILE (make one with: \
             head -c 32 /dev/urandom | base64 > FILE), or --insecure-no-token if an open API \
             is meant",
            out.listen
        ));
    }
    Ok(())
}

/// The store's options that only make sense together.
fn check_store(out: &ControlArgs) -> Result<(), String> {
    if out.kube_store {
        if out.data_dir_given {
            return Err("--data-dir: with --store kubernetes every version is kept in the cluster, nothing on disk; --data-dir goes with --store dir".into());
        }
        if out.ca_dir.is_some() {
            return Err("--ca-dir: with --store kubernetes the mesh CA's key is kept in the Secret spur-mesh-ca, shared by every replica; use --mesh-ca".into());
        }
    } else {
        if out.namespace.is_some() {
            return Err("--namespace only applies with --store kubernetes".into());
        }
        if out.lease_duration != crate::leader::DEFAULT_LEASE {
            return Err("--lease-duration only applies with --store kubernetes".into());
        }
        if out.mesh_ca {
            return Err(
                "--mesh-ca goes with --store kubernetes (with --store dir: --ca-dir DIR)".into(),
            );
        }
    }
    Ok(())
}

/// A token file's content, with a hint at how to make one when it is missing.
fn read_token(path: &std::path::Path, flag: &str) -> Result<String, String> {
    spur_config::read_token_file(path).map_err(|e| {
        if path.exists() {
            format!("{flag}: {e}")
        } else {
            format!(
                "{flag}: {e}\n(make one with: head -c 32 /dev/urandom | base64 > {})",
                path.display()
            )
        }
    })
}

/// The mesh CA's options, its token files read.
fn ca_options(parsed: &ControlArgs) -> Result<Option<crate::CaOptions>, String> {
    if parsed.ca_dir.is_none() && !parsed.mesh_ca {
        return Ok(None);
    }
    let dir = parsed.ca_dir.clone().unwrap_or_default();
    let join_token = match &parsed.join_token_file {
        Some(f) => read_token(f, "--join-token-file")?,
        None => String::new(),
    };
    let join_tokens = match &parsed.join_tokens {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("--join-tokens: cannot read {}: {e}", f.display()))?;
            crate::join::parse_file(&text, &parsed.trust_domain).map_err(|errors| {
                format!("--join-tokens {}:\n  {}", f.display(), errors.join("\n  "))
            })?
        }
        None => Vec::new(),
    };
    Ok(Some(crate::CaOptions {
        dir,
        join_token,
        trust_domain: parsed.trust_domain.clone(),
        ttl: parsed.cert_ttl,
        join_tokens,
    }))
}

/// Entry point of `spur control ARGS` and of the `spur-control` binary. `init_log` sets up
/// logging (the umbrella binary shares the proxy's).
pub fn main(args: &[String], init_log: impl FnOnce(Option<&str>)) -> ExitCode {
    let parsed = match parse(args) {
        Ok(p) => p,
        Err(msg) if msg.is_empty() => {
            // The help text ends quietly when its reader goes away (`spur control --help |
            // head`), as spur_proxy::cli::print_help's does; the server keeps SIGPIPE ignored.
            #[cfg(unix)]
            // SAFETY: sets the action of one signal to its default; no handler runs our code.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("spur control: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_log(parsed.log_format.as_deref());
    let token = match parsed
        .token_file
        .as_deref()
        .map(|f| read_token(f, "--token-file"))
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("spur control: {e}");
            return ExitCode::from(1);
        }
    };
    let ca = match ca_options(&parsed) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spur control: {e}");
            return ExitCode::from(1);
        }
    };
    let tls = match (&parsed.tls_cert, &parsed.tls_key) {
        (Some(cert), Some(key)) => match crate::tls::ApiTls::load(cert, key) {
            Ok(t) => Some(std::sync::Arc::new(t)),
            Err(e) => {
                eprintln!("spur control: {e}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };
    let https = tls.is_some();
    if parsed.insecure_no_token && !parsed.listen.ip().is_loopback() {
        tracing::warn!(listen = %parsed.listen, "--insecure-no-token: anyone who can reach this address may change every group's config");
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let kubernetes = parsed.kubernetes.then(|| crate::k8s::KubernetesOptions {
            kubeconfig: parsed.kubeconfig.clone(),
        });
        let store = if parsed.kube_store {
            crate::StoreOptions::Kubernetes(crate::KubeStoreOptions {
                namespace: parsed.namespace.clone(),
                kubeconfig: parsed.kubeconfig.clone(),
                lease_duration: parsed.lease_duration,
            })
        } else {
            crate::StoreOptions::Dir
        };
        let mesh = parsed.mesh.then(|| crate::mesh::MeshOptions {
            namespaces: parsed.mesh_namespaces.clone(),
            trust_domain: parsed.trust_domain.clone(),
        });
        let opts = crate::Options {
            mesh,
            listen: parsed.listen,
            data_dir: parsed.data_dir.clone(),
            store,
            token,
            ca,
            kubernetes,
            forget_proxies_after: parsed.forget_proxies_after,
            limits: crate::serve::Limits {
                max_connections: parsed.max_connections,
                ..Default::default()
            },
        };
        let handle = match crate::start_with_tls(opts, tls).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("spur control: {e}");
                return ExitCode::from(1);
            }
        };
        let store = handle.control.store.kind();
        tracing::info!(addr = %handle.addr, https, store, data_dir = %parsed.data_dir.display(), groups = handle.control.store.groups().len(), kubernetes = parsed.kubernetes, "control plane listening");
        wait_for_signal().await;
        tracing::info!("control plane stopping");
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
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

    fn parse_args(a: &[&str]) -> Result<ControlArgs, String> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn refuses_what_does_not_go_together() {
        for (args, msg) in [
            (&["--ca-dir", "d"][..], "--ca-dir needs a way"),
            (&["--join-tokens", "f"], "go with --ca-dir"),
            (&["--listen", "0.0.0.0:7070"], "--insecure-no-token"),
            (&["--listen", "[::]:7070"], "--insecure-no-token"),
            (&["--token-file", "t", "--insecure-no-token"], "contradict"),
            (&["--max-connections", "0"], "positive"),
            (&["--forget-proxies-after", "1s"], "at least 60s"),
            (&["--trust-domain", "Cluster.Local"], "not a trust domain"),
            (&["--store", "etcd"], "not dir or kubernetes"),
            (
                &["--namespace", "spur"],
                "only applies with --store kubernetes",
            ),
            (
                &["--mesh-ca", "--join-token-file", "t"],
                "goes with --store kubernetes",
            ),
            (
                &[
                    "--store",
                    "kubernetes",
                    "--ca-dir",
                    "d",
                    "--join-token-file",
                    "t",
                ],
                "use --mesh-ca",
            ),
            (
                &["--store", "kubernetes", "--mesh-ca"],
                "--mesh-ca needs a way",
            ),
            (
                &["--store", "kubernetes", "--data-dir", "d"],
                "nothing on disk",
            ),
            (
                &["--store", "kubernetes", "--lease-duration", "0s"],
                "at least 1s",
            ),
        ] {
            let e = parse_args(args).unwrap_err();
            assert!(e.contains(msg), "{args:?}: {e}");
        }
        for ok in [
            &["--ca-dir", "d", "--kubernetes"][..],
            &[
                "--ca-dir",
                "d",
                "--join-tokens",
                "f",
                "--join-token-file",
                "g",
            ],
            &["--listen", "0.0.0.0:7070", "--token-file", "t"],
            &["--listen", "0.0.0.0:7070", "--insecure-no-token"],
            &["--listen", "[::1]:7070"],
            &["--store", "dir", "--ca-dir", "d", "--join-token-file", "t"],
            &[
                "--store",
                "kubernetes",
                "--namespace",
                "spur",
                "--kubeconfig",
                "k",
                "--mesh-ca",
                "--join-tokens",
                "f",
            ],
        ] {
            assert!(parse_args(ok).is_ok(), "{ok:?}");
        }
    }
}
