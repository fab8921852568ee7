//! End-to-end: the web console in headless Chromium (issue 16, "Done when"). A control plane
//! with a token, two `spur proxy --control` processes of group `shop`, two backends; the test
//! drives the page as a user: a wrong token sees nothing; signing in shows both proxies;
//! toggling a flag changes the proxies' `/config`; a diff between two versions; a rollback;
//! traffic figures that move while load runs; tap lines of requests it sent. Values planted
//! in a config, a proxy's report and a tap line (`<img src=x onerror=alert(1)>`) must show
//! as text and open no dialog. Screenshots of each page go to `target/console-screenshots`
//! (or `$SPUR_SCREENSHOTS`).
//!
//! Needs Debian's `chromium` (installed by `.ci/run`); without it the test says "skipped"
//! and passes, unless `SPUR_REQUIRE_CHROMIUM=1` (set by `.ci/run`) makes that a failure.

#[path = "support/cdp.rs"]
mod cdp;
mod common;

use bytes::Bytes;
use cdp::Browser;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "console-token-9f3";
const XSS: &str = "<img src=x onerror=alert(1)>";

fn config(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"
listeners:
  - name: web
    listen: "127.0.0.1:0"
    routes:
      - name: checkout-beta
        match: {{ path_prefix: /checkout, flag: new-checkout }}
        cluster: v2
      - name: checkout
        match: {{ path_prefix: /checkout }}
        split: [{{ cluster: v1, weight: 80 }}, {{ cluster: v2, weight: 20 }}]
clusters:
  - {{ name: v1, endpoints: ["{v1}"] }}
  - {{ name: v2, endpoints: ["{v2}"] }}
flags:
  new-checkout:
    enabled: false
    rules:
      - {{ header: x-user-group, values: ["{XSS}"] }}
"#
    )
}

fn screenshots_dir() -> PathBuf {
    let dir = std::env::var_os("SPUR_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn proxy_config(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_slice(&get(admin, "/config", &[]).await.body).unwrap()
}

/// Posts what a rogue (or buggy) proxy could report: names and errors that are markup.
async fn report_rogue(c: SocketAddr) {
    let report = serde_json::json!({
        "applied_version": 1,
        "error": XSS,
        "traffic": { "targets": [{ "listener": "web", "route": XSS, "cluster": "v1",
            "requests": 3, "errors": 0, "retries": 0, "latency": [[20, 3]] }], "clusters": [] }
    });
    let (s, v) = call(
        c,
        "POST",
        "/v1/groups/shop/proxies/rogue/status",
        Some(&report.to_string()),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

/// What the steps of the browser test work with.
struct Scene {
    c: SocketAddr,
    ui: String,
    admins: [SocketAddr; 2],
    webs: [SocketAddr; 2],
    shots: PathBuf,
}

impl Scene {
    fn shot(&self, name: &str) -> PathBuf {
        self.shots.join(format!("{name}.png"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let Some(chromium) = cdp::chromium() else {
        if std::env::var("SPUR_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
            panic!("SPUR_REQUIRE_CHROMIUM=1, but no chromium is installed");
        }
        eprintln!("skipped: no chromium (apt-get install chromium)");
        return;
    };
    let (cp, _dir) = start_control(Some(TOKEN)).await;
    let c = cp.addr;
    let v1 = named_backend("v1").await;
    let v2 = backend(|_req: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_millis(4)).await;
        Response::new(Full::new(Bytes::from_static(b"v2")))
    })
    .await;
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some(&config(v1.addr, v2.addr)),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let dir = temp_dir("console");
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let url = format!("http://{c}");
    let proxy = |node: &'static str| {
        spawn_spur_with(
            &[
                "proxy",
                "--control",
                &url,
                "--node",
                node,
                "--group",
                "shop",
                "--admin",
                "127.0.0.1:0",
                "--token-file",
                token_file.to_str().unwrap(),
            ],
            1,
            true,
        )
    };
    let (p1, p2) = (proxy("node-1"), proxy("node-2"));
    let admins = [p1.admin.unwrap(), p2.admin.unwrap()];
    let webs = [p1.listeners["web"], p2.listeners["web"]];
    report_rogue(c).await;

    let mut b = Browser::launch(&chromium, dir.join("profile")).await;
    let scene = Scene {
        c,
        ui: format!("http://{c}/ui"),
        admins,
        webs,
        shots: screenshots_dir(),
    };
    wrong_token_sees_nothing(&mut b, &scene).await;
    signing_in_shows_both_proxies(&mut b, &scene).await;
    the_flag_switch_reaches_the_proxies(&mut b, &scene).await;
    diff_and_rollback(&mut b, &scene).await;
    the_editor_validates_before_storing(&mut b, &scene).await;
    traffic_moves_with_the_load(&mut b, &scene).await;
    tap_shows_the_requests_sent(&mut b, &scene).await;
    a_rollout_shows_its_steps_and_verdicts(&mut b, &scene, v1.addr, v2.addr).await;

    // Nothing the page showed ran as markup.
    assert_eq!(
        b.eval("document.querySelectorAll('img[src=\"x\"]').length")
            .await,
        0
    );
    assert!(
        b.dialogs.is_empty(),
        "an injected script opened a dialog: {:?}",
        b.dialogs
    );
    assert!(
        b.exceptions.is_empty(),
        "the page threw: {:?}",
        b.exceptions
    );
    eprintln!("screenshots in {}", scene.shots.display());
}

/// A wrong token sees nothing: the sign-in page says why, and no name of the mesh shows.
async fn wrong_token_sees_nothing(b: &mut Browser, s: &Scene) {
    let ui = &s.ui;
    let shot = |name: &str| s.shot(name);
    b.goto(ui).await;
    b.wait_for(
        "!!document.querySelector('#signin-form')",
        Duration::from_secs(10),
    )
    .await;
    b.type_into("#token", "not-the-token").await;
    b.click("#signin").await;
    let err = b
        .wait_for(
            "document.querySelector('#signin-error')?.textContent",
            Duration::from_secs(10),
        )
        .await;
    assert!(err.as_str().unwrap().contains("refused the token"), "{err}");
    let text = b.eval("document.body.innerText").await;
    let text = text.as_str().unwrap();
    for hidden in ["shop", "node-1", "checkout"] {
        assert!(
            !text.contains(hidden),
            "a wrong token shows `{hidden}`:\n{text}"
        );
    }
    b.screenshot(&shot("1-wrong-token")).await;
}

/// Signed in: both proxies of the group, and the rogue one's markup as text.
async fn signing_in_shows_both_proxies(b: &mut Browser, s: &Scene) {
    let shot = |name: &str| s.shot(name);
    b.type_into("#token", TOKEN).await;
    b.click("#signin").await;
    for node in ["node-1", "node-2"] {
        b.wait_for(
            &format!("document.querySelector('#proxies tr[data-node=\"{node}\"]')?.dataset.state === 'ok'"),
            Duration::from_secs(15),
        )
        .await;
    }
    let shown = b
        .wait_for(
            "document.querySelector('#proxies tr[data-node=\"rogue\"] td.err')?.textContent",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(shown, XSS, "a proxy's error shows as text");
    assert_eq!(
        b.eval("document.querySelector('#proxies tr[data-node=\"rogue\"]').dataset.state")
            .await,
        "failing"
    );
    let group_row = b
        .eval("document.querySelector('#groups tr[data-group=\"shop\"]')?.innerText")
        .await;
    assert!(group_row.as_str().unwrap().contains("put"), "{group_row}");
    b.screenshot(&shot("2-mesh")).await;
}

/// The flag switch changes the proxies' `/config`; a rule's markup shows as text.
async fn the_flag_switch_reaches_the_proxies(b: &mut Browser, s: &Scene) {
    let ui = &s.ui;
    let admins = s.admins;
    b.goto(&format!("{ui}#/group/shop")).await;
    b.wait_for(
        "!!document.querySelector('input.flag-switch[data-flag=\"new-checkout\"]')",
        Duration::from_secs(10),
    )
    .await;
    let rule = b
        .eval("document.querySelector('#flags .rules li').textContent")
        .await;
    assert!(
        rule.as_str().unwrap().contains(XSS),
        "a flag rule's value shows as text: {rule}"
    );
    assert_eq!(
        b.eval("document.querySelector('input.flag-switch').checked")
            .await,
        false
    );
    b.click("#flags label.switch").await;
    for admin in admins {
        assert!(
            eventually(Duration::from_secs(10), || async {
                let cfg = proxy_config(admin).await;
                cfg["version"] == 2 && cfg["config"]["flags"]["new-checkout"]["enabled"] == true
            })
            .await,
            "the proxy's /config has the flag on: {}",
            proxy_config(admin).await
        );
    }
    b.wait_for("document.querySelector('#history tr[data-version=\"2\"]')?.innerText.includes('flag new-checkout')", Duration::from_secs(10)).await;
    b.wait_for(
        "document.querySelector('input.flag-switch').checked",
        Duration::from_secs(5),
    )
    .await;
}

/// A diff between versions 1 and 2; a rollback (two clicks: arm, confirm) the proxies follow.
async fn diff_and_rollback(b: &mut Browser, s: &Scene) {
    let admins = s.admins;
    let shot = |name: &str| s.shot(name);
    b.eval("(() => { const f = document.querySelector('#diff-from'); f.value = '1'; const t = document.querySelector('#diff-to'); t.value = '2'; return true; })()").await;
    b.click("#diff-show").await;
    let diff = b
        .wait_for(
            "document.querySelector('#diff:not([hidden])')?.textContent",
            Duration::from_secs(10),
        )
        .await;
    let diff = diff.as_str().unwrap();
    assert!(
        diff.contains("--- shop version 1") && diff.contains("+++ shop version 2"),
        "{diff}"
    );
    assert!(
        diff.lines()
            .any(|l| l.starts_with('-') && l.contains("enabled: false")),
        "{diff}"
    );
    assert!(
        diff.lines()
            .any(|l| l.starts_with('+') && l.contains("enabled: true")),
        "{diff}"
    );
    b.screenshot(&shot("3-group-flag-and-diff")).await;

    // Roll back to version 1 (two clicks: arm, confirm): the proxies follow.
    b.click("button.rollback[data-version=\"1\"]").await;
    b.click("button.rollback[data-version=\"1\"]").await;
    b.wait_for("document.querySelector('#history tr[data-version=\"3\"]')?.innerText.includes('rollback to 1')", Duration::from_secs(10)).await;
    for admin in admins {
        assert!(
            eventually(Duration::from_secs(10), || async {
                let cfg = proxy_config(admin).await;
                cfg["version"] == 3 && cfg["config"]["flags"]["new-checkout"]["enabled"] == false
            })
            .await,
            "the rollback reaches the proxy"
        );
    }
    b.wait_for(
        "document.querySelector('input.flag-switch').checked === false",
        Duration::from_secs(5),
    )
    .await;
}

/// The editor shows validation errors at their paths, and stores nothing.
async fn the_editor_validates_before_storing(b: &mut Browser, s: &Scene) {
    let c = s.c;
    let shot = |name: &str| s.shot(name);
    b.eval("(() => { const e = document.querySelector('#editor'); e.value = e.value.replace('cluster: v2', 'cluster: nowhere'); return true; })()").await;
    b.click("#validate").await;
    let errors = b
        .wait_for(
            "document.querySelector('#errors')?.innerText",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        errors
            .as_str()
            .unwrap()
            .contains("listeners[0].routes[0].cluster"),
        "{errors}"
    );
    b.screenshot(&shot("4-group-rollback-and-editor")).await;
    let (_, current) = call(c, "GET", "/v1/groups/shop/config", None, Some(TOKEN)).await;
    assert_eq!(current["version"], 3, "validation stored nothing");
}

/// Traffic: the figures move while load runs (slow, then faster).
async fn traffic_moves_with_the_load(b: &mut Browser, s: &Scene) {
    let ui = &s.ui;
    let webs = s.webs;
    let shot = |name: &str| s.shot(name);
    let stop = Arc::new(AtomicBool::new(false));
    let pause_us = Arc::new(AtomicU64::new(60_000));
    let load = {
        let (stop, pause_us) = (stop.clone(), pause_us.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for web in webs {
                    get(web, &format!("/checkout/load-{i}"), &[]).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_micros(pause_us.load(Ordering::Relaxed))).await;
            }
        })
    };
    b.goto(&format!("{ui}#/traffic/shop")).await;
    let rps = "parseFloat(document.querySelector('#traffic-routes tr[data-route=\"checkout\"][data-cluster=\"v1\"] td.rps')?.textContent) || 0";
    let first = b
        .wait_for(rps, Duration::from_secs(20))
        .await
        .as_f64()
        .unwrap();
    pause_us.store(5_000, Ordering::Relaxed);
    let moved = b
        .wait_for(
            &format!("(() => {{ const r = {rps}; return r > {first} * 1.5 ? r : 0; }})()"),
            Duration::from_secs(25),
        )
        .await;
    assert!(moved.as_f64().unwrap() > first, "{first} -> {moved}");
    b.wait_for(
        "document.querySelectorAll('#charts svg path').length >= 2",
        Duration::from_secs(10),
    )
    .await;
    let row = b
        .eval("document.querySelector('#traffic-routes').innerText")
        .await;
    assert!(
        row.as_str().unwrap().contains(XSS),
        "a reported route name shows as text"
    );
    b.screenshot(&shot("5-traffic")).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
}

/// Tap: lines of the requests this test sends, filtered by route; a rogue line's markup shows as text.
async fn tap_shows_the_requests_sent(b: &mut Browser, s: &Scene) {
    let c = s.c;
    let ui = &s.ui;
    let webs = s.webs;
    let shot = |name: &str| s.shot(name);
    b.goto(&format!("{ui}#/tap/shop")).await;
    b.type_into("#tap-route", "checkout").await;
    b.click("#tap-start").await;
    b.wait_for(
        "document.querySelector('#tap-state').textContent.startsWith('watching')",
        Duration::from_secs(10),
    )
    .await;
    let sender = tokio::spawn(async move {
        for i in 0..150 {
            for web in webs {
                get(
                    web,
                    &format!("/checkout/tapped-{i}"),
                    &[("x-secret", "s3cr3t-value")],
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    b.wait_for(
        "document.querySelectorAll('#tap-lines tr[data-route=\"checkout\"]').length >= 4",
        Duration::from_secs(15),
    )
    .await;
    // Each proxy starts tapping when its own watch stream hears of the session: the second
    // one's lines may come a moment after the first one's.
    b.wait_for(
        "(t => t.includes('node-1') && t.includes('node-2'))([...document.querySelectorAll('#tap-lines tr[data-route=\"checkout\"]')].map(r => r.innerText).join(' '))",
        Duration::from_secs(15),
    )
    .await;
    // A line with markup in it, as a rogue proxy could post.
    let rogue = serde_json::json!({ "ts": 1, "method": "GET", "path": format!("/{XSS}"), "route": "checkout",
        "cluster": "v1", "endpoint": "-", "status": 200, "duration_ms": 1.0, "attempts": 1 });
    let (s, _) = call(
        c,
        "POST",
        "/v1/groups/shop/proxies/rogue/tap",
        Some(&rogue.to_string()),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200);
    let path = b.wait_for("[...document.querySelectorAll('#tap-lines td.path')].map(t => t.textContent).find(t => t.includes('onerror'))", Duration::from_secs(10)).await;
    assert_eq!(path, format!("/{XSS}"));
    let tapped = b
        .eval("[...document.querySelectorAll('#tap-lines tr')].map(r => r.innerText).join('\\n')")
        .await;
    let tapped = tapped.as_str().unwrap();
    assert!(tapped.contains("/checkout/tapped-"), "{tapped}");
    assert!(
        tapped.contains("node-1") && tapped.contains("node-2"),
        "{tapped}"
    );
    assert!(!tapped.contains("s3cr3t"), "no header value in tap lines");
    b.screenshot(&shot("6-tap")).await;
    b.click("#tap-stop").await;
    sender.abort();
}

/// The group page shows a rollout's state, step and verdicts while it runs under load.
async fn a_rollout_shows_its_steps_and_verdicts(
    b: &mut Browser,
    s: &Scene,
    v1: SocketAddr,
    v2: SocketAddr,
) {
    let (c, ui, webs) = (s.c, &s.ui, s.webs);
    let with_rollout = format!(
        "{}rollouts:\n  checkout-v2: {{ route: checkout, canary: v2, steps: [50, 100], interval: 2s, min_requests: 5, min_p99_increase: 100ms }}\n",
        config(v1, v2)
    );
    let (st, v) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some(&with_rollout),
        Some(TOKEN),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    b.goto(&format!("{ui}#/group/shop")).await;
    let state = "document.querySelector('#rollouts [data-rollout=\"checkout-v2\"] [data-state]')?.dataset.state";
    b.wait_for(&format!("{state} === 'idle'"), Duration::from_secs(10))
        .await;
    let (st, v) = call(
        c,
        "POST",
        "/v1/groups/shop/rollouts/checkout-v2/start",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                for web in webs {
                    get(web, &format!("/checkout/rollout-{i}"), &[]).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    b.wait_for(&format!("{state} === 'running'"), Duration::from_secs(10))
        .await;
    b.wait_for(&format!("{state} === 'succeeded'"), Duration::from_secs(30))
        .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let text = b
        .wait_for(
            "document.querySelectorAll('#rollouts tr.verdict').length === 1 && document.querySelector('#rollouts').innerText",
            Duration::from_secs(10),
        )
        .await;
    let text = text.as_str().unwrap();
    assert!(text.contains("step 2/2 (100% to v2)"), "{text}");
    assert!(
        text.contains("canary error rate 0.0% vs baseline 0.0%"),
        "{text}"
    );
    b.screenshot(&s.shot("7-rollout")).await;
}
