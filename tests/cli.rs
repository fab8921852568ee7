//! End-to-end: the `spur` command line — validate, demo, unknown commands.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn spur() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spur"))
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("spur-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn validate_prints_a_summary_or_every_error() {
    let good = write_temp(
        "good.yaml",
        "listeners:\n  - { name: a, listen: 127.0.0.1:8080, cluster: c }\nclusters:\n  - { name: c, endpoints: [\"127.0.0.1:9000\"] }\n",
    );
    let out = spur().arg("validate").arg(&good).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "ok: 1 listener(s), 0 route(s), 1 cluster(s) with 1 static endpoint(s), 0 flag(s)"
        ),
        "{stdout}"
    );

    let bad = write_temp(
        "bad.json",
        r#"{"listeners":[{"name":"a","listen":"nope","cluster":"c"},{"name":"b","listen":"127.0.0.1:1","routes":[{"cluster":"missing","retry":{"attempts":0}}]}],
            "clusters":[{"name":"c","endpoints":["127.0.0.1:2"],"connect_timeout":"soon"}]}"#,
    );
    let out = spur().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "bad.json: 4 error(s)",
        "  listeners[0].listen: `nope` is not an IP address with a port such as 127.0.0.1:8080\n",
        "  clusters[0].connect_timeout: `soon` is not a duration (write e.g. `250ms`, `2s`, `1m`)\n",
        "  listeners[1].routes[0].cluster: unknown cluster `missing`\n",
        "  listeners[1].routes[0].retry.attempts: must be between 1 and 10\n",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }

    let unknown = write_temp("unknown.yaml", "listeners: []\ncolour: blue\n");
    let out = spur().arg("validate").arg(&unknown).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `colour`"));

    let out = spur()
        .args(["validate", "/does/not/exist.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /does/not/exist.yaml"));

    let out = spur().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command `frobnicate`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_routes_it_prints() {
    let mut child = spur()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let urls = tokio::task::spawn_blocking(move || {
        let mut urls = std::collections::HashMap::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let mut words = line.split_whitespace();
            if let (Some(k @ ("proxy" | "admin" | "control")), Some(u)) =
                (words.next(), words.next())
            {
                urls.insert(
                    k.to_string(),
                    u.trim_start_matches("http://")
                        .parse::<std::net::SocketAddr>()
                        .unwrap(),
                );
            }
            if line.trim().starts_with("Ctrl-C") {
                break;
            }
        }
        urls
    })
    .await
    .unwrap();
    let (addr, admin, control) = (urls["proxy"], urls["admin"], urls["control"]);

    // The flag sends beta users to v2, and v2 sees the flag.
    let beta = get(addr, "/checkout", &[("x-user-group", "beta")]).await;
    assert_eq!(beta.status, 200);
    assert!(
        beta.text().contains("\"backend\": \"v2\""),
        "{}",
        beta.text()
    );
    assert!(
        beta.text().contains("\"x-spur-flags\": \"new-checkout\""),
        "{}",
        beta.text()
    );
    // The canary split is sticky per user and sends most users to v1.
    let mut on_v1 = 0;
    for u in 0..50 {
        let user = format!("u{u}");
        let a = get(addr, "/hello", &[("x-user-id", &user)])
            .await
            .header("x-backend")
            .unwrap()
            .to_string();
        let b = get(addr, "/hello", &[("x-user-id", &user)])
            .await
            .header("x-backend")
            .unwrap()
            .to_string();
        assert_eq!(a, b);
        on_v1 += usize::from(a == "v1");
    }
    assert!(on_v1 >= 35, "only {on_v1}/50 users on v1");
    let labels = [
        ("listener", "demo"),
        ("route", "new-checkout"),
        ("cluster", "v2"),
        ("code", "200"),
    ];
    assert!(metric(admin, "spur_requests_total", &labels).await >= Some(1.0));

    // The printed PATCH line turns the flag off, live.
    let (s, v) = call(
        control,
        "PATCH",
        "/v1/groups/demo/flags/new-checkout",
        Some(r#"{"enabled": false}"#),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(addr, "/checkout", &[("x-user-group", "beta")])
                .await
                .header("x-backend")
                == Some("v1")
        })
        .await
    );
    // /checkout is mirrored to v2, which answers differently (it names itself).
    assert!(
        eventually(Duration::from_secs(3), || async {
            metric(
                admin,
                "spur_mirror_requests_total",
                &[("cluster", "v2"), ("outcome", "differ")],
            )
            .await
                >= Some(1.0)
        })
        .await
    );

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `spur inject app.yaml | head`, `spur help | head`: a command whose reader goes away ends
/// quietly by SIGPIPE, as Unix tools do, instead of panicking on the failed write. (The
/// servers, init-iptables, top and tap keep SIGPIPE ignored; their help texts do not.)
#[test]
fn a_command_whose_reader_goes_away_ends_quietly() {
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::ExitStatusExt;
    let app = write_temp("closed-reader.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: a, namespace: n }\nspec:\n  selector: { matchLabels: { app: a } }\n  template:\n    metadata: { labels: { app: a } }\n    spec: { containers: [ { name: a, image: a } ] }\n");
    let cases: [&[&str]; 8] = [
        &["help"],
        &["proxy", "--help"],
        &["control", "--help"],
        &["demo", "--help"],
        &["init-iptables", "--help"],
        &["validate", "--help"],
        &["explain", "--help"],
        &["inject", app.to_str().unwrap()],
    ];
    for args in cases {
        // stdout is a socket whose other end is already closed: the first write fails.
        let (out, reader) = UnixStream::pair().unwrap();
        drop(reader);
        let result = spur()
            .args(args)
            .stdout(std::os::fd::OwnedFd::from(out))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!stderr.contains("panicked"), "spur {args:?}: {stderr}");
        assert_eq!(
            result.status.signal(),
            Some(13),
            "spur {args:?} should end by SIGPIPE: {:?} {stderr}",
            result.status
        );
    }
}
