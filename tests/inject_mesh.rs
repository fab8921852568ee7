//! End-to-end: `spur inject` meshes by default (issue 14, part 2). The manifests it prints
//! give each sidecar a projected service-account token and `--sa-token-file`; the configs
//! it writes with `--config-dir` terminate mutual TLS inbound and originate it to meshed
//! Services. Here two sidecars run those exact configs and arguments (interception aside:
//! the test calls the client's outbound listener, and the Service's EndpointSlice points
//! at the server's inbound listener), with identities from the mesh CA checked against a
//! fake Kubernetes API.

mod common;
#[path = "support/fake_kube.rs"]
mod fake_kube;

use common::*;
use fake_kube::FakeKube;
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn spur(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(args)
        .output()
        .unwrap()
}

/// An app as a user writes it: a server (`echo`, serving on `app_port`) with a Service,
/// and a client; each with its own service account.
fn manifest(app_port: u16, client_annotations: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{ name: echo, namespace: demo }}
spec:
  selector: {{ matchLabels: {{ app: echo }} }}
  template:
    metadata: {{ labels: {{ app: echo }} }}
    spec:
      serviceAccountName: echo
      containers:
        - name: echo
          image: example/echo
          ports: [{{ name: http, containerPort: {app_port} }}]
          readinessProbe: {{ httpGet: {{ path: /healthz, port: http }} }}
---
apiVersion: v1
kind: Service
metadata: {{ name: echo, namespace: demo }}
spec:
  selector: {{ app: echo }}
  ports: [{{ port: 80, targetPort: http }}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: client, namespace: demo }}
spec:
  selector: {{ matchLabels: {{ app: client }} }}
  template:
    metadata:
      labels: {{ app: client }}
      annotations: {{ {client_annotations} }}
    spec:
      serviceAccountName: client
      containers: [{{ name: client, image: example/curl }}]
"#
    )
}

/// Runs `spur inject` on `input` with `args`; returns the printed manifests (parsed) and
/// the config directory.
fn inject(input: &str, args: &[&str]) -> (Vec<Value>, PathBuf) {
    let dir = temp_dir("inject-mesh");
    let file = dir.join("app.yaml");
    std::fs::write(&file, input).unwrap();
    let configs = dir.join("configs");
    let mut all = vec![
        "inject",
        file.to_str().unwrap(),
        "--config-dir",
        configs.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let out = spur(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = String::from_utf8(out.stdout)
        .unwrap()
        .split("\n---\n")
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .collect();
    (docs, configs)
}

/// The `spur-proxy` sidecar's args, with the pod's placeholders as given.
fn sidecar_args(doc: &Value) -> Vec<String> {
    let init = doc["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .unwrap();
    let proxy = init.iter().find(|c| c["name"] == "spur-proxy").unwrap();
    proxy["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_sidecars_talk_mutual_tls_with_their_service_accounts() {
    let app = named_backend("echo-app").await;
    // Held until the sidecars bind them (a port chosen and let go may be taken meanwhile).
    let held: Vec<HeldPort> = (0..4).map(|_| reserved_port()).collect();
    let (echo_in, echo_out, client_out) = (held[0].port(), held[1].port(), held[2].port());
    let input = manifest(app.addr.port(), "");
    // One run per sidecar: on this one host the two outbound listeners need two ports.
    let (echo_docs, echo_configs) = inject(
        &input,
        &[
            "--inbound-port",
            &echo_in.to_string(),
            "--outbound-port",
            &echo_out.to_string(),
        ],
    );
    let (client_docs, client_configs) = inject(
        &input,
        &[
            "--inbound-port",
            &held[3].port().to_string(),
            "--outbound-port",
            &client_out.to_string(),
        ],
    );

    let kube = FakeKube::start().await;
    kube.token("tok-echo", "system:serviceaccount:demo:echo", &["spur"]);
    kube.token("tok-client", "system:serviceaccount:demo:client", &["spur"]);
    // Service echo's ready pod: the echo sidecar's inbound listener (in a pod, spur-init
    // redirects the pod's port there).
    kube.slice("demo", "echo", &["127.0.0.1"], echo_in);
    let dir = temp_dir("inject-mesh-cp");
    let cp = spur_control::start(spur_control::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        ca: Some(spur_control::CaOptions {
            dir: dir.join("ca"),
            ..Default::default()
        }),
        kubernetes: Some(spur_control::k8s::KubernetesOptions {
            kubeconfig: Some(kube.kubeconfig(&dir)),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = cp.addr;
    for (group, configs) in [("echo", &echo_configs), ("client", &client_configs)] {
        let yaml = read(&configs.join(format!("spur-{group}.yaml")));
        let path = format!("/v1/groups/{group}/config");
        let (s, v) = call(c, "PUT", &path, Some(&yaml), None).await;
        assert_eq!(s, 200, "{group}: {v}");
    }
    let synced = eventually(Duration::from_secs(10), || async {
        let (_, v) = call(
            c,
            "GET",
            "/v1/groups/client/config?rendered=true",
            None,
            None,
        )
        .await;
        v["config"]["clusters"][0]["endpoints"][0] == format!("127.0.0.1:{echo_in}")
    })
    .await;
    assert!(synced, "discovery never filled cluster echo.demo");

    // Each sidecar as injected: its args, the control URL and the token file swapped in.
    let run = |docs: &[Value], name: &str, token: &str, listeners: usize| {
        let doc = docs.iter().find(|d| d["metadata"]["name"] == name).unwrap();
        let token_file = temp_dir("sa").join("token");
        std::fs::write(&token_file, token).unwrap();
        let args: Vec<String> = sidecar_args(doc)
            .into_iter()
            .map(|a| match a.as_str() {
                "http://spur-control.spur-system.svc:7070" => format!("http://{c}"),
                "$(POD_NAME)" => format!("{name}-pod"),
                "0.0.0.0:9901" => "127.0.0.1:0".into(),
                "/var/run/secrets/spur/token" => token_file.to_str().unwrap().into(),
                _ => a,
            })
            .collect();
        assert!(args.iter().any(|a| a == "--sa-token-file"), "{args:?}");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_spur_with(&args, listeners, true)
    };
    let echo = run(&echo_docs, "echo", "tok-echo", 2);
    let client = run(&client_docs, "client", "tok-client", 1);

    // Through the client's outbound listener, by the Service's name, as the app calls it.
    let out = std::net::SocketAddr::from(([127, 0, 0, 1], client_out));
    let answer = get(out, "/hello", &[("host", "echo.demo.svc.cluster.local")]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "echo-app");
    assert_eq!(
        answer.header("x-echo-x-spur-peer-identity"),
        Some("spiffe://cluster.local/ns/demo/sa/client"),
        "the echo sidecar saw the client's identity"
    );
    let short = get(out, "/", &[("host", "echo")]).await;
    assert_eq!(short.status, 200, "the short name from the same namespace");

    // Without a mesh certificate the echo sidecar's inbound listener lets nothing in.
    let inbound = std::net::SocketAddr::from(([127, 0, 0, 1], echo_in));
    let plain = try_call(inbound, "GET", "/", None, None).await;
    assert!(plain.is_none(), "plain HTTP got an answer: {plain:?}");
    drop((echo, client));
}

/// What injection adds to a meshed pod and to one that opts out with `spur.dev/mtls:
/// disabled`: the token volume, Prometheus' annotations, the probe ports left out of
/// inbound interception; and what the generated configs make of an unmeshed destination.
#[test]
fn meshed_by_default_and_opted_out_by_annotation() {
    let (docs, configs) = inject(&manifest(8080, "spur.dev/mtls: disabled"), &[]);
    let echo = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "echo")
        .unwrap();
    let client = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "client")
        .unwrap();

    let template = &echo["spec"]["template"];
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9901");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let volume = &template["spec"]["volumes"][0];
    assert_eq!(volume["name"], "spur-identity");
    let token = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "spur");
    assert!(sidecar_args(echo).contains(&"--sa-token-file".to_string()));
    let init = &template["spec"]["initContainers"][0]["args"];
    let skip = init
        .as_sequence()
        .unwrap()
        .iter()
        .skip_while(|a| *a != "--skip-inbound-ports")
        .nth(1)
        .unwrap();
    assert_eq!(
        skip, "9901,8080",
        "the readiness probe's named port, resolved"
    );

    // Opted out: a sidecar without identity.
    assert!(!sidecar_args(client).contains(&"--sa-token-file".to_string()));
    assert!(client["spec"]["template"]["spec"].get("volumes").is_none());
    let client_cfg = read(&configs.join("spur-client.yaml"));
    let echo_cfg = read(&configs.join("spur-echo.yaml"));
    assert!(echo_cfg.contains("    tls: {}"), "{echo_cfg}");
    assert!(
        client_cfg
            .contains("tls: { expect_identities: [\"spiffe://cluster.local/ns/demo/sa/echo\"] }"),
        "{client_cfg}"
    );
    assert!(client_cfg.contains("(spur.dev/mtls: disabled: no identity, plain HTTP)"));
    for cfg in [&client_cfg, &echo_cfg] {
        let path = configs.join("check.yaml");
        std::fs::write(&path, cfg).unwrap();
        let out = spur(&["validate", "--kubernetes", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A misspelt value is an error, not a guess.
    let dir = temp_dir("inject-typo");
    let file = dir.join("app.yaml");
    std::fs::write(&file, manifest(8080, "spur.dev/mtls: off")).unwrap();
    let out = spur(&["inject", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spur.dev/mtls: `off` is not `enabled` or `disabled`"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// `deploy/example/spur-echo.yaml` and `spur-client.yaml` are what `spur inject
/// --config-dir` writes for `deploy/example/echo.yaml` (SPUR_BLESS=1 rewrites them).
#[test]
fn deploy_example_configs_are_the_generated_ones() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/example");
    let dir = temp_dir("example-configs");
    let out = spur(&[
        "inject",
        root.join("echo.yaml").to_str().unwrap(),
        "--config-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    for group in ["echo", "client"] {
        let name = format!("spur-{group}.yaml");
        let generated = read(&dir.join(&name));
        if std::env::var_os("SPUR_BLESS").is_some_and(|v| !v.is_empty()) {
            std::fs::write(root.join(&name), &generated).unwrap();
        }
        assert_eq!(
            read(&root.join(&name)),
            generated,
            "deploy/example/{name} differs from what spur inject --config-dir writes"
        );
    }
}
