//! The two containers and the volumes `spur inject` adds to a pod: what they run, with
//! which rights, and what they mount.
//!
//! - `spur-init` runs `spur init-iptables` as root with `NET_ADMIN` and `NET_RAW` for the
//!   length of one `iptables-restore`.
//! - `spur-proxy`, the native sidecar, runs `spur proxy --control URL --node $(POD_NAME)
//!   --group GROUP --admin 0.0.0.0:ADMIN` as a non-root user with no capabilities and a
//!   read-only root filesystem, probed on `/ready` and `/live`.
//! - A meshed pod's sidecar also mounts a projected service-account token with audience
//!   `spur` ([`mounts`]) and runs with `--sa-token-file`: the mesh CA checks that token with
//!   the TokenReview API and issues the certificate of that service account. The audience
//!   keeps the token useless against the Kubernetes API, and the API's own token (which
//!   the app may have) useless against the mesh CA. The kubelet rotates the file; the proxy
//!   reads it again at each renewal.

use super::Options;
use serde_yaml_ng::{Mapping, Value};

pub const PROXY: &str = "spur-proxy";
pub const INIT: &str = "spur-init";

pub fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

pub fn strings(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|s| Value::from(*s)).collect())
}

fn http_probe(path: &str, port: u16, extra: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    m.insert(
        "httpGet".into(),
        map([("path", path.into()), ("port", port.into())]),
    );
    for (k, v) in extra {
        m.insert(k.into(), v);
    }
    Value::Mapping(m)
}

/// A volume mounted into the sidecar: its name, its source, where it is mounted, and the
/// flag and file the proxy is given.
pub struct Mount {
    pub volume: &'static str,
    source: Value,
    dir: &'static str,
    flag: &'static str,
    file: &'static str,
}

impl Mount {
    /// The pod's `volumes` entry.
    pub fn volume(&self) -> Value {
        let mut m = Mapping::new();
        m.insert("name".into(), self.volume.into());
        if let Value::Mapping(source) = &self.source {
            m.extend(source.clone());
        }
        Value::Mapping(m)
    }
}

/// Where the projected service-account token is mounted in the sidecar.
pub const IDENTITY_DIR: &str = "/var/run/secrets/spur";
/// How long a projected token lives before the kubelet replaces it (the API's minimum is
/// 10 minutes; an hour is what Kubernetes itself uses for its own tokens).
const TOKEN_SECONDS: u32 = 3600;

/// The sidecar's volumes: the control plane's token and CA (Secrets, when given), and for a
/// meshed pod its service-account token for the mesh CA, projected with audience `spur`.
pub fn mounts(opts: &Options, meshed: bool) -> Vec<Mount> {
    let mut out = Vec::new();
    if let Some(secret) = &opts.token_secret {
        out.push(Mount {
            volume: "spur-token",
            source: map([("secret", map([("secretName", secret.as_str().into())]))]),
            dir: "/etc/spur/token",
            flag: "--token-file",
            file: "/etc/spur/token/token",
        });
    }
    if let Some(secret) = &opts.control_ca_secret {
        out.push(Mount {
            volume: "spur-control-ca",
            source: map([("secret", map([("secretName", secret.as_str().into())]))]),
            dir: "/etc/spur/control-ca",
            flag: "--control-ca",
            file: "/etc/spur/control-ca/ca.crt",
        });
    }
    if meshed {
        let token = map([
            ("audience", AUDIENCE.into()),
            ("expirationSeconds", TOKEN_SECONDS.into()),
            ("path", "token".into()),
        ]);
        out.push(Mount {
            volume: "spur-identity",
            source: map([(
                "projected",
                map([(
                    "sources",
                    Value::Sequence(vec![map([("serviceAccountToken", token)])]),
                )]),
            )]),
            dir: IDENTITY_DIR,
            flag: "--sa-token-file",
            file: "/var/run/secrets/spur/token",
        });
    }
    out
}

/// The audience of the projected token: what the mesh CA asks the TokenReview API for.
pub const AUDIENCE: &str = "spur";

/// The `spur-proxy` native sidecar of a pod of `group`.
pub fn proxy_container(opts: &Options, group: &str, mounts: &[Mount]) -> Value {
    let admin = format!("0.0.0.0:{}", opts.admin_port);
    let mut args = vec![
        "proxy",
        "--control",
        &opts.control,
        "--node",
        "$(POD_NAME)",
        "--group",
        group,
        "--admin",
        &admin,
    ];
    for s in mounts {
        args.extend([s.flag, s.file]);
    }
    let mut c = map([
        ("name", PROXY.into()),
        ("image", opts.image.as_str().into()),
        ("args", strings(&args)),
        (
            "env",
            Value::Sequence(vec![map([
                ("name", "POD_NAME".into()),
                (
                    "valueFrom",
                    map([("fieldRef", map([("fieldPath", "metadata.name".into())]))]),
                ),
            ])]),
        ),
        (
            "ports",
            Value::Sequence(vec![map([
                ("name", "spur-admin".into()),
                ("containerPort", opts.admin_port.into()),
            ])]),
        ),
        // A native sidecar: see the module documentation.
        ("restartPolicy", "Always".into()),
        // Holds the application back until the first config is applied (2 minutes).
        (
            "startupProbe",
            http_probe(
                "/ready",
                opts.admin_port,
                vec![
                    ("periodSeconds", 1.into()),
                    ("failureThreshold", 120.into()),
                ],
            ),
        ),
        (
            "readinessProbe",
            http_probe("/ready", opts.admin_port, vec![("periodSeconds", 5.into())]),
        ),
        (
            "livenessProbe",
            http_probe("/live", opts.admin_port, vec![("periodSeconds", 10.into())]),
        ),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", "50m".into()), ("memory", "32Mi".into())]),
                ),
                ("limits", map([("memory", "128Mi".into())])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsUser", opts.uid.into()),
                ("runAsNonRoot", true.into()),
                ("readOnlyRootFilesystem", true.into()),
                ("allowPrivilegeEscalation", false.into()),
                ("capabilities", map([("drop", strings(&["ALL"]))])),
            ]),
        ),
    ]);
    if !mounts.is_empty() {
        let mounts = mounts
            .iter()
            .map(|s| {
                map([
                    ("name", s.volume.into()),
                    ("mountPath", s.dir.into()),
                    ("readOnly", true.into()),
                ])
            })
            .collect();
        if let Value::Mapping(m) = &mut c {
            m.insert("volumeMounts".into(), Value::Sequence(mounts));
        }
    }
    c
}

/// The `spur-init` init container: interception for every port but `skip_ports` (both
/// ways) and, inbound, the admin port and `skip_inbound` (the kubelet's probes).
pub fn init_container(opts: &Options, skip_ports: &[u16], skip_inbound: &[u16]) -> Value {
    let (inbound, outbound, uid) = (
        opts.inbound_port.to_string(),
        opts.outbound_port.to_string(),
        opts.uid.to_string(),
    );
    let mut inbound_skips = vec![opts.admin_port];
    inbound_skips.extend(skip_inbound.iter().filter(|p| **p != opts.admin_port));
    let admin = crate::iptables::join_ports(&inbound_skips);
    let mut args = vec![
        "init-iptables",
        "--inbound-port",
        &inbound,
        "--outbound-port",
        &outbound,
        "--proxy-uid",
        &uid,
        // The kubelet's probes and Prometheus reach the admin server directly, and the
        // probes of the app its ports (the kubelet has no mesh certificate).
        "--skip-inbound-ports",
        &admin,
    ];
    let skip = crate::iptables::join_ports(skip_ports);
    if !skip_ports.is_empty() {
        args.extend(["--skip-ports", &skip]);
    }
    map([
        ("name", INIT.into()),
        ("image", opts.init_image.as_str().into()),
        ("args", strings(&args)),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", "10m".into()), ("memory", "16Mi".into())]),
                ),
                ("limits", map([("memory", "64Mi".into())])),
            ]),
        ),
        // Root with NET_ADMIN and NET_RAW in the pod's own network namespace, for the
        // length of one iptables-restore. The root filesystem stays writable because
        // iptables takes its lock file under /run.
        (
            "securityContext",
            map([
                ("runAsUser", 0.into()),
                ("runAsNonRoot", false.into()),
                ("allowPrivilegeEscalation", false.into()),
                (
                    "capabilities",
                    map([
                        ("add", strings(&["NET_ADMIN", "NET_RAW"])),
                        ("drop", strings(&["ALL"])),
                    ]),
                ),
            ]),
        ),
    ])
}
