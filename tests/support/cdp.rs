//! Headless Chromium driven over the DevTools protocol (a WebSocket of JSON commands), for
//! the console's browser test. Why not WebDriver: the protocol needs no driver process and
//! no new crate (tokio-tungstenite is already a test dependency), and it reports what the
//! test must see: dialogs an injected script would open, console errors, screenshots.
//!
//! Debian's `chromium` package (`.ci/run` installs it). The browser runs with a fresh
//! profile in a temporary directory and is killed when the [`Browser`] is dropped.
#![allow(dead_code)]

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    child: Child,
    profile: PathBuf,
    ws: Ws,
    next_id: u64,
    /// JavaScript dialogs (alert, confirm...) the page opened: an injected script would.
    pub dialogs: Vec<String>,
    /// Exceptions thrown by the page's scripts.
    pub exceptions: Vec<String>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The Chromium binary, if installed.
pub fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|p| p.is_file())
}

impl Browser {
    /// Starts headless Chromium on a blank page and connects to it.
    pub async fn launch(binary: &Path, profile: PathBuf) -> Browser {
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes its port to the profile once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u16>().ok()))
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ws_url = loop {
            let list = super::common::get(
                format!("127.0.0.1:{port}").parse().unwrap(),
                "/json/list",
                &[],
            )
            .await;
            let pages: Value = serde_json::from_slice(&list.body).unwrap_or(Value::Null);
            let page = pages
                .as_array()
                .and_then(|a| a.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from));
            if let Some(url) = page {
                break url;
            }
            assert!(Instant::now() < deadline, "chromium has no page");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("connect to the page");
        let mut b = Browser {
            child,
            profile,
            ws,
            next_id: 0,
            dialogs: Vec::new(),
            exceptions: Vec::new(),
        };
        b.call("Page.enable", json!({})).await;
        b.call("Runtime.enable", json!({})).await;
        b
    }

    /// Sends a command and waits for its answer (events meanwhile are noted).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .expect("send to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
                .expect("chromium closed the connection")
                .expect("a DevTools message");
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
            self.event(v).await;
        }
    }

    async fn event(&mut self, v: Value) {
        match v["method"].as_str() {
            Some("Page.javascriptDialogOpening") => {
                self.dialogs
                    .push(v["params"]["message"].as_str().unwrap_or("").to_string());
                // Dismiss it, or the page would stay blocked.
                let msg = json!({ "id": 0, "method": "Page.handleJavaScriptDialog", "params": { "accept": true } });
                let _ = self.ws.send(Message::text(msg.to_string())).await;
            }
            Some("Runtime.exceptionThrown") => self
                .exceptions
                .push(v["params"]["exceptionDetails"].to_string()),
            _ => {}
        }
    }

    /// Evaluates a JavaScript expression in the page (awaiting a promise) and returns its
    /// value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("`{expr}` threw: {e}");
        }
        r["result"]["value"].clone()
    }

    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(15),
        )
        .await;
    }

    /// Polls `expr` until it is truthy; returns its value, or panics naming `expr`.
    pub async fn wait_for(&mut self, expr: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expr).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                panic!("waited {within:?} for `{expr}` (last: {v})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element matching `selector` as a user would: a mouse press and release
    /// at its centre.
    pub async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let at = self
            .wait_for(
                &format!(
                    "(() => {{ const e = document.querySelector({sel}); if (!e) return null;
                     e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
                     return (r.width && r.height) ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()"
                ),
                Duration::from_secs(10),
            )
            .await;
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    /// Focuses the field and types `text` into it as key input would.
    pub async fn type_into(&mut self, selector: &str, text: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        self.wait_for(
            &format!("(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.focus(); e.value = ''; return true; }})()"),
            Duration::from_secs(10),
        )
        .await;
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Writes a PNG of the whole page to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let height = self
            .eval("Math.max(900, document.documentElement.scrollHeight)")
            .await
            .as_u64()
            .unwrap_or(900)
            .min(4000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        self.call("Emulation.clearDeviceMetricsOverride", json!({}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}
