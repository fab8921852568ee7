//! End-to-end: `spur inject` and `spur init-iptables`, through the real binary.
//!
//! Golden files: `tests/golden/NAME.in.yaml` is injected and compared, byte for byte, with
//! `tests/golden/NAME.out.yaml`; `NAME.rules` holds the iptables rules that the injected
//! init container's arguments produce. After an intended change to the output, regenerate
//! them with
//!
//! ```sh
//! SPUR_BLESS=1 cargo test --test inject
//! ```
//!
//! and review `git diff tests/golden deploy/example` before committing: the diff is
//! exactly what changes for users. The same goes for `deploy/example/echo.injected.yaml`,
//! which must stay `spur inject deploy/example/echo.yaml`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn spur() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spur"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden(name: &str) -> PathBuf {
    root().join("tests/golden").join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `spur ARGS` with `stdin` piped in.
fn run_with_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = spur()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn succeed(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Compares `actual` with the golden file, or rewrites the file under SPUR_BLESS=1.
fn check_golden(path: &Path, actual: &str) {
    if std::env::var_os("SPUR_BLESS").is_some_and(|v| !v.is_empty()) {
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = read(path);
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the output, first at line {}:\n  expected: {:?}\n  actual:   {:?}\n\
             If the change is intended: SPUR_BLESS=1 cargo test --test inject\n\
             ---- actual output ----\n{actual}",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line),
        );
    }
}

/// Golden cases: name, extra arguments, and whether the output must equal the input.
const CASES: &[(&str, &[&str], bool)] = &[
    ("deployment", &[], false),
    (
        "statefulset",
        &[
            "--image",
            "registry.example.com/mesh/spur:0.1.0",
            "--control",
            "http://spur-control.mesh.svc:7070/",
            "--inbound-port",
            "16006",
            "--outbound-port=16001",
            "--admin-port",
            "16090",
            "--uid",
            "2102",
        ],
        false,
    ),
    ("multi", &[], false),
    ("list", &[], false),
    ("skip-ports", &[], false),
    (
        "secrets",
        &[
            "--control",
            "https://spur-control.mesh.svc:7443",
            "--token-secret",
            "spur-token",
            "--control-ca-secret",
            "spur-control-ca",
        ],
        false,
    ),
    ("opted-out", &[], true),
    ("already-injected", &[], true),
];

/// For every case: the file and stdin give the golden output; injecting that output
/// again changes nothing; the no-op cases print their input byte for byte.
#[test]
fn inject_matches_the_golden_files_and_is_idempotent() {
    for (name, extra, unchanged) in CASES {
        let input_path = golden(&format!("{name}.in.yaml"));
        let input = read(&input_path);

        let mut args = vec!["inject", input_path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let from_file = succeed(spur().args(&args).output().unwrap(), name);
        check_golden(&golden(&format!("{name}.out.yaml")), &from_file);

        let mut stdin_args = vec!["inject", "-"];
        stdin_args.extend_from_slice(extra);
        let from_stdin = succeed(run_with_stdin(&stdin_args, &input), name);
        assert_eq!(from_stdin, from_file, "{name}: stdin and file differ");

        let twice = succeed(run_with_stdin(&stdin_args, &from_file), name);
        assert_eq!(
            twice, from_file,
            "{name}: injecting twice changed the output"
        );

        if *unchanged {
            assert_eq!(from_file, input, "{name}: expected the input unchanged");
        } else {
            assert_ne!(from_file, input, "{name}: nothing was injected");
        }
    }
}

/// What the injected pod spec holds, read back as YAML rather than as text.
#[test]
fn injected_workloads_have_the_sidecar_and_the_init_container() {
    let out = read(&golden("multi.out.yaml"));
    let docs: Vec<serde_yaml_ng::Value> = out
        .split("\n---\n")
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 4);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Service", "ConfigMap", "Deployment", "CronJob"]);

    let deploy = &docs[2]["spec"]["template"];
    let cron = &docs[3]["spec"]["jobTemplate"]["spec"]["template"];
    for (template, group) in [(deploy, "checkout"), (cron, "checkout-report")] {
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["spur.dev/injected"].as_str(), Some("true"));
        assert_eq!(
            annotations["spur.dev/injected-version"].as_str(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        let init = template["spec"]["initContainers"].as_sequence().unwrap();
        let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["spur-init", "spur-proxy"]);
        let proxy = &init[1];
        let args: Vec<&str> = proxy["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "proxy",
                "--control",
                "http://spur-control.spur-system.svc:7070",
                "--node",
                "$(POD_NAME)",
                "--group",
                group,
                "--admin",
                "0.0.0.0:9901",
                "--sa-token-file",
                "/var/run/secrets/spur/token"
            ]
        );
        assert_eq!(proxy["restartPolicy"].as_str(), Some("Always"));
        assert_eq!(
            proxy["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/ready")
        );
        assert_eq!(
            proxy["livenessProbe"]["httpGet"]["path"].as_str(),
            Some("/live")
        );
        assert_eq!(proxy["securityContext"]["runAsUser"].as_u64(), Some(1337));
        assert_eq!(
            proxy["env"][0]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some("metadata.name")
        );
        assert_eq!(
            init[0]["securityContext"]["capabilities"]["add"],
            serde_yaml_ng::from_str::<serde_yaml_ng::Value>("[NET_ADMIN, NET_RAW]").unwrap()
        );
        // The application's containers are untouched.
        assert_eq!(
            template["spec"]["containers"].as_sequence().unwrap().len(),
            1
        );
    }
}

#[test]
fn untouched_documents_keep_their_comments_and_rewritten_ones_their_header() {
    let input = read(&golden("multi.in.yaml"));
    let out = read(&golden("multi.out.yaml"));
    let service_and_config_map: String = input
        .split("---\n")
        .take(3)
        .collect::<Vec<_>>()
        .join("---\n");
    assert!(out.starts_with(&service_and_config_map), "{out}");
    assert!(out.contains("---\n# Source: checkout/templates/cronjob.yaml\napiVersion: batch/v1\n"));
    // A string kubectl would read as a boolean stays quoted.
    assert!(read(&golden("deployment.out.yaml")).contains("value: \"yes\"\n"));
}

#[test]
fn skipped_workloads_are_reported_on_stderr() {
    let out = spur()
        .args(["inject", golden("opted-out.in.yaml").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    for expected in [
        "document 1: Deployment/legacy-batch: skipped (spur.dev/inject: disabled)",
        "document 2: StatefulSet/cache: skipped (spur.dev/inject: disabled)",
        "document 3: DaemonSet/node-agent: skipped (hostNetwork",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
}

/// Errors exit 1, print nothing on stdout (a pipe to kubectl applies nothing) and name
/// the document, the workload and the field.
#[test]
fn bad_input_is_refused_with_the_document_and_field() {
    let deployment = |name: &str, extra: &str, containers: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n{extra}spec:\n  template:\n    spec:\n      containers: {containers}\n"
        )
    };
    let cases = [
        (
            format!("{}---\nkind: Pod\nmetadata: [\n", deployment("ok", "", "[{name: a, image: a}]")),
            vec!["<stdin>: document 2: invalid YAML:", "line 12"],
        ),
        (
            deployment("empty", "", "[]"),
            vec!["document 1: Deployment/empty: spec.template.spec.containers: missing or empty"],
        ),
        (
            deployment("typo", "  annotations: {spur.dev/inject: \"off\"}\n", "[{name: a}]"),
            vec!["Deployment/typo: metadata.annotations.spur.dev/inject: `off` is not `enabled` or `disabled`"],
        ),
        (
            format!(
                "{}---\n{}",
                deployment("ports", "  annotations: {spur.dev/skip-ports: \"5432,pg\"}\n", "[{name: a}]"),
                deployment("hand-made", "", "[{name: spur-proxy}]")
            ),
            vec![
                "document 1: Deployment/ports: metadata.annotations.spur.dev/skip-ports: `pg` is not a port number",
                "document 2: Deployment/hand-made: spec.template.spec.containers: already has a container named `spur-proxy`",
            ],
        ),
        (
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n  spec: {}\n".into(),
            vec!["document 1: List/(unnamed): items[0]: Pod/p: spec.containers: missing or empty"],
        ),
    ];
    for (input, expected) in cases {
        let out = run_with_stdin(&["inject", "-"], &input);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{input}\n{stderr}");
        assert!(
            out.stdout.is_empty(),
            "stdout must stay empty:\n{}",
            text(&out.stdout)
        );
        for e in expected {
            assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
        }
    }

    let out = spur()
        .args(["inject", "/no/such/file.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read /no/such/file.yaml"));

    for args in [&["inject"][..], &["inject", "x.yaml", "--uid", "root"]] {
        let out = spur().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// The committed example is exactly what `spur inject` makes of the plain manifest, and
/// the group configs the guide pushes are valid.
#[test]
fn deploy_example_is_the_injected_plain_manifest() {
    let example = root().join("deploy/example");
    let out = succeed(
        spur()
            .args(["inject", example.join("echo.yaml").to_str().unwrap()])
            .output()
            .unwrap(),
        "inject deploy/example/echo.yaml",
    );
    check_golden(&example.join("echo.injected.yaml"), &out);
    // The control plane opts out of injection, so injecting every file of deploy/ is safe.
    let control = root().join("deploy/control-plane.yaml");
    let out = spur()
        .args(["inject", control.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        succeed(out, "inject deploy/control-plane.yaml"),
        read(&control)
    );
    // Checked as the control plane of deploy/ (`--kubernetes`) checks them.
    for config in ["spur-echo.yaml", "spur-client.yaml"] {
        let out = spur()
            .args([
                "validate",
                "--kubernetes",
                example.join(config).to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{config}: {}", text(&out.stderr));
    }
}

/// The arguments `spur inject` gives spur-init, run with --dry-run: the rules match the
/// golden file, so the two commands agree on flags and ports.
#[test]
fn init_container_args_produce_the_golden_rules() {
    for name in ["skip-ports", "statefulset"] {
        let out: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&read(&golden(&format!("{name}.out.yaml")))).unwrap();
        let init = &out["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(init["name"].as_str(), Some("spur-init"));
        let mut args: Vec<&str> = init["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        args.push("--dry-run");
        let rules = succeed(spur().args(&args).output().unwrap(), name);
        check_golden(&golden(&format!("{name}.rules")), &rules);
    }
}

/// A directory holding fake `iptables-restore` / `iptables-save` scripts, used as PATH.
fn fake_iptables(test: &str, restore_body: &str, save_output: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("spur-iptables-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\nPATH=/usr/bin:/bin\nhere=$(dirname \"$0\")\n{body}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write("iptables-restore", restore_body);
    write("iptables-save", &format!("printf '%s' '{save_output}'"));
    write(
        "ip6tables-restore",
        &restore_body
            .replace("$here/args", "$here/args6")
            .replace("$here/stdin", "$here/stdin6"),
    );
    write("ip6tables-save", "printf ''");
    dir
}

#[test]
fn init_iptables_applies_the_rules_with_iptables_restore() {
    let dir = fake_iptables(
        "apply",
        "echo \"$@\" > \"$here/args\"; cat > \"$here/stdin\"",
        "*nat\n-A PREROUTING -p tcp -j SPUR_INBOUND\nCOMMIT\n",
    );
    let dry = succeed(
        spur()
            .args([
                "init-iptables",
                "--dry-run",
                "--ipv6",
                "off",
                "--skip-ports",
                "5432",
            ])
            .output()
            .unwrap(),
        "dry run",
    );
    let out = spur()
        .args(["init-iptables", "--ipv6", "off", "--skip-ports", "5432"])
        .env("PATH", &dir)
        .output()
        .unwrap();
    let applied = succeed(out, "apply");
    assert_eq!(read(&dir.join("args")).trim(), "--noflush");
    let stdin = read(&dir.join("stdin"));
    assert_eq!(stdin, applied, "prints what it applied");
    // A second run: the PREROUTING jump is there already, so only it is left out.
    let expected: String = dry
        .lines()
        .filter(|l| *l != "-A PREROUTING -p tcp -j SPUR_INBOUND")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(stdin, expected);
    assert!(stdin.contains("-A OUTPUT -p tcp -j SPUR_OUTPUT\n"));
    assert!(!dir.join("stdin6").exists(), "--ipv6 off: no IPv6 rules");

    // --ipv6 on: the IPv6 table goes to ip6tables-restore, whole (its save shows no jumps).
    let dry6 = succeed(
        spur()
            .args(["init-iptables", "--dry-run", "--ipv6", "on"])
            .output()
            .unwrap(),
        "dry run v6",
    );
    let out = spur()
        .args(["init-iptables", "--ipv6", "on"])
        .env("PATH", &dir)
        .output()
        .unwrap();
    succeed(out, "apply v6");
    assert_eq!(read(&dir.join("args6")).trim(), "--noflush");
    let stdin6 = read(&dir.join("stdin6"));
    let v6_part = &dry6[dry6
        .find("# spur init-iptables (IPv6")
        .expect("the dry run shows IPv6 rules")..];
    assert_eq!(stdin6, v6_part);
    assert!(stdin6
        .contains("-A SPUR_OUTPUT ! -d ::1/128 -o lo -m owner --uid-owner 1337 -j SPUR_INBOUND\n"));
    assert!(stdin6.contains("-A PREROUTING -p tcp -j SPUR_INBOUND\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_iptables_reports_a_missing_or_failing_iptables_restore() {
    let empty = std::env::temp_dir().join(format!("spur-iptables-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = spur()
        .args(["init-iptables", "--ipv6", "off"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("`iptables-restore` not found on PATH"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let dir = fake_iptables(
        "fail",
        "cat > /dev/null; echo 'iptables-restore v1.8.9 (nf_tables): line 9 failed' >&2; exit 1",
        "",
    );
    let out = spur()
        .args(["init-iptables", "--ipv6", "off"])
        .env("PATH", &dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 9 failed"), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(out.stdout.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}
