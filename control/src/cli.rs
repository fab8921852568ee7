//! The `spur control` / `spur-control` command line.

use std::path::PathBuf;
use std::process::ExitCode;

pub const USAGE: &str = "usage: spur control [--listen ADDR] [--data-dir DIR] [--token-file FILE] [--log-format json|text]
                    [--ca-dir DIR --join-token-file FILE [--trust-domain D] [--cert-ttl 24h]]
                    [--kubernetes [--kubeconfig PATH]] [--tls-cert FILE --tls-key FILE]

Runs the control plane: configs per group, history, rollback, watch streams for proxies.
Defaults: --listen 127.0.0.1:7070, --data-dir ./spur-data. With --token-file, every /v1/
call needs `Authorization: Bearer <the file's content>`. With --ca-dir, the control plane is
the mesh CA: POST /v1/identity/certify signs workload certificates (SPIFFE IDs of the trust
domain, default cluster.local) for proxies that present the join token. With --kubernetes,
clusters written `k8s: name.namespace:port` get the ready endpoints of that Service from its
EndpointSlices, watched through the Kubernetes API (--kubeconfig PATH; without it
KUBECONFIG or ~/.kube/config if present, else the pod's service account); each change is
pushed to the proxies as a new version. With --tls-cert and --tls-key (PEM; re-read when
they change) the API is served over HTTPS only: proxies use --control https://HOST:PORT
and, for a private CA, --control-ca FILE.";

#[derive(Debug)]
pub struct ControlArgs {
    pub listen: std::net::SocketAddr,
    pub data_dir: PathBuf,
    pub token_file: Option<PathBuf>,
    pub log_format: Option<String>,
    pub ca_dir: Option<PathBuf>,
    pub join_token_file: Option<PathBuf>,
    pub trust_domain: String,
    pub cert_ttl: std::time::Duration,
    pub kubernetes: bool,
    pub kubeconfig: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

pub fn parse(args: &[String]) -> Result<ControlArgs, String> {
    let mut out = ControlArgs {
        listen: "127.0.0.1:7070".parse().expect("default address"),
        data_dir: PathBuf::from("spur-data"),
        token_file: None,
        log_format: None,
        ca_dir: None,
        join_token_file: None,
        trust_domain: "cluster.local".into(),
        cert_ttl: std::time::Duration::from_secs(24 * 3600),
        kubernetes: false,
        kubeconfig: None,
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
            "--data-dir" => out.data_dir = PathBuf::from(value("--data-dir")?),
            "--token-file" => out.token_file = Some(PathBuf::from(value("--token-file")?)),
            "--log-format" => out.log_format = Some(value("--log-format")?),
            "--ca-dir" => out.ca_dir = Some(PathBuf::from(value("--ca-dir")?)),
            "--join-token-file" => {
                out.join_token_file = Some(PathBuf::from(value("--join-token-file")?))
            }
            "--trust-domain" => out.trust_domain = value("--trust-domain")?,
            "--cert-ttl" => {
                let v = value("--cert-ttl")?;
                let d: spur_config::Duration = v.parse().map_err(|e| format!("--cert-ttl: {e}"))?;
                if d.get() < std::time::Duration::from_secs(60) {
                    return Err("--cert-ttl: at least 1m".into());
                }
                out.cert_ttl = d.get();
            }
            "--kubernetes" => out.kubernetes = true,
            "--kubeconfig" => out.kubeconfig = Some(PathBuf::from(value("--kubeconfig")?)),
            "--tls-cert" => out.tls_cert = Some(PathBuf::from(value("--tls-cert")?)),
            "--tls-key" => out.tls_key = Some(PathBuf::from(value("--tls-key")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    if out.ca_dir.is_some() != out.join_token_file.is_some() {
        return Err("--ca-dir and --join-token-file go together".into());
    }
    if out.tls_cert.is_some() != out.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    if out.kubeconfig.is_some() && !out.kubernetes {
        return Err("--kubeconfig only applies with --kubernetes".into());
    }
    Ok(out)
}

/// Entry point of `spur control ARGS` and of the `spur-control` binary. `init_log` sets up
/// logging (the umbrella binary shares the proxy's).
pub fn main(args: &[String], init_log: impl FnOnce(Option<&str>)) -> ExitCode {
    let parsed = match parse(args) {
        Ok(p) => p,
        Err(msg) if msg.is_empty() => {
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
        .map(spur_config::read_token_file)
        .transpose()
    {
        Ok(t) => t,
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
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let ca = match (&parsed.ca_dir, &parsed.join_token_file) {
            (Some(dir), Some(f)) => match spur_config::read_token_file(f) {
                Ok(join_token) => Some(crate::CaOptions {
                    dir: dir.clone(),
                    join_token,
                    trust_domain: parsed.trust_domain.clone(),
                    ttl: parsed.cert_ttl,
                }),
                Err(e) => {
                    eprintln!("spur control: {e}");
                    return ExitCode::from(1);
                }
            },
            _ => None,
        };
        let kubernetes = parsed.kubernetes.then(|| crate::k8s::KubernetesOptions {
            kubeconfig: parsed.kubeconfig.clone(),
        });
        let opts = crate::Options { listen: parsed.listen, data_dir: parsed.data_dir.clone(), token, ca, kubernetes };
        let handle = match crate::start_with_tls(opts, tls).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("spur control: {e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(addr = %handle.addr, https, data_dir = %parsed.data_dir.display(), groups = handle.control.store.groups().len(), kubernetes = parsed.kubernetes, "control plane listening");
        wait_for_signal().await;
        tracing::info!("control plane stopping");
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
