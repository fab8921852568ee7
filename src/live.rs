//! `spur top` and `spur tap`: a group's live traffic and sampled requests in a terminal,
//! from the control plane's API (`GET /v1/groups/{g}/traffic`, `GET /v1/groups/{g}/tap`),
//! with the same token as every other call. The numbers are the console's: the proxies'
//! reports, merged over the whole group.

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use spur_config::args::Flags;
use spur_proxy::control_client::{self, ControlClient};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

const TOP_USAGE: &str =
    "usage: spur top --control URL --group G [--token-file F] [--control-ca F] [--once]

A group's traffic, per route (and split side) and per cluster: requests per second, success
rate, p50 and p99 latency and retries over the last 10 s, and ejected endpoints, merged over
every proxy of the group. On a terminal the table is redrawn in place every 2 s until
Ctrl-C; otherwise (or with --once) it is printed once.
  --token-file F   the control API's bearer token
  --control-ca F   the CA bundle an https:// control plane's certificate must chain to";

const TAP_USAGE: &str =
    "usage: spur tap --control URL --group G [--route R] [--status 5xx|503] [--token-file F]
               [--control-ca F] [--count N]

Streams sampled requests of the group's proxies as JSON lines (ts, node, method, path, route,
cluster, endpoint, status, grpc_status, duration_ms, flags, split, attempts, error), at most
100 a second per proxy, until Ctrl-C (or N lines). Proxies sample only while someone taps.
Header values and bodies are never sent.";

/// A control plane to call, for one group (also used by `spur rollout`).
pub(crate) struct Remote {
    pub(crate) url: String,
    pub(crate) group: String,
    pub(crate) token: Option<String>,
    pub(crate) client: ControlClient,
}

struct Args {
    remote: Remote,
    once: bool,
    route: Option<String>,
    status: Option<String>,
    count: Option<u64>,
}

fn parse(args: &[String], tap: bool) -> Result<Args, String> {
    let (mut url, mut group, mut token_file, mut ca) = (None, None, None, None);
    let (mut once, mut route, mut status, mut count) = (false, None, None, None);
    let mut f = Flags::new(args);
    while let Some(flag) = f.next_flag() {
        match flag {
            "--control" => url = Some(f.value(flag)?.trim_end_matches('/').to_string()),
            "--group" => group = Some(f.value(flag)?),
            "--token-file" => token_file = Some(f.value(flag)?),
            "--control-ca" => ca = Some(f.value(flag)?),
            "--once" if !tap => once = true,
            "--route" if tap => route = Some(f.value(flag)?),
            "--status" if tap => {
                let s = f.value(flag)?;
                s.parse::<spur_config::report::StatusFilter>()
                    .map_err(|e| format!("--status: {e}"))?;
                status = Some(s);
            }
            "--count" if tap => {
                let v = f.value(flag)?;
                count = Some(
                    v.parse()
                        .map_err(|_| format!("--count: `{v}` is not a number"))?,
                );
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    let remote = Remote::from_flags(url, group, token_file, ca)?;
    Ok(Args {
        remote,
        once,
        route,
        status,
        count,
    })
}

fn run_with(args: &[String], tap: bool, usage: &str) -> ExitCode {
    let command = if tap { "tap" } else { "top" };
    let a = match crate::args_or_exit(command, usage, parse(args, tap)) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let rt = crate::client_runtime();
    let result = rt.block_on(async {
        if tap {
            tap_stream(&a).await
        } else {
            top_loop(&a).await
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spur {}: {e}", if tap { "tap" } else { "top" });
            ExitCode::from(1)
        }
    }
}

pub fn top(args: &[String]) -> ExitCode {
    run_with(args, false, TOP_USAGE)
}

pub fn tap(args: &[String]) -> ExitCode {
    run_with(args, true, TAP_USAGE)
}

impl Remote {
    /// The control plane named by `--control`, `--group`, `--token-file` and
    /// `--control-ca`, checked (the URL's scheme, the token file read, the CA loaded).
    pub(crate) fn from_flags(
        url: Option<String>,
        group: Option<String>,
        token_file: Option<String>,
        ca: Option<String>,
    ) -> Result<Remote, String> {
        let url = url.ok_or("--control URL is required")?;
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!(
                "--control: `{url}` is not an http:// or https:// URL"
            ));
        }
        let group = group.ok_or("--group G is required")?;
        let token = match token_file {
            Some(p) => Some(spur_config::read_token_file(std::path::Path::new(&p))?),
            None => None,
        };
        let client = control_client::client(ca.as_deref().map(std::path::Path::new))?;
        Ok(Remote {
            url,
            group,
            token,
            client,
        })
    }

    async fn get(&self, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        self.send(http::Method::GET, path).await
    }

    /// Sends a call without a body; an answer other than 2xx is an error with the control
    /// plane's message.
    async fn send(
        &self,
        method: http::Method,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("bad URL: {e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| format!("{} did not answer in 10 s", self.url))?
            .map_err(|e| format!("{}: {}", self.url, control_client::error_chain(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        let doc: Value = body
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let why = doc["errors"][0]["message"].as_str().unwrap_or("");
        Err(format!("the control plane answered {status}: {why}"))
    }

    pub(crate) async fn json(&self, path: &str) -> Result<Value, String> {
        self.json_of(http::Method::GET, path).await
    }

    /// [`Remote::send`], and the answer as JSON.
    pub(crate) async fn json_of(&self, method: http::Method, path: &str) -> Result<Value, String> {
        let body = self.send(method, path).await?.into_body().collect().await;
        let body = body
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
    }
}

async fn top_loop(a: &Args) -> Result<(), String> {
    let path = format!("/v1/groups/{}/traffic?window=1m", a.remote.group);
    let terminal = std::io::stdout().is_terminal() && !a.once;
    loop {
        let doc = a.remote.json(&path).await?;
        let mut out = String::new();
        if terminal {
            out.push_str("\x1b[H\x1b[2J");
        }
        out.push_str(&table(&a.remote.group, &doc));
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        if !terminal {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn cell(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

fn rate(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |x| format!("{:.2}%", x * 100.0))
}

/// The figures of `spur top`, as text.
fn table(group: &str, doc: &Value) -> String {
    let mut out = format!("spur top: group {group} (last 10 s, every proxy)\n\n");
    let empty = Vec::new();
    let routes = doc["routes"].as_array().unwrap_or(&empty);
    out.push_str(&format!(
        "{:<24} {:<20} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
        "ROUTE", "CLUSTER", "SIDE", "REQ/S", "SUCCESS", "P50 MS", "P99 MS", "RETRIES"
    ));
    for r in routes {
        let n = &r["now"];
        out.push_str(&format!(
            "{:<24} {:<20} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
            printable(&r["route"]),
            printable(&r["cluster"]),
            r["side"].as_u64().map_or("-".into(), |s| s.to_string()),
            cell(&n["rps"], 2),
            rate(&n["success_rate"]),
            cell(&n["p50_ms"], 1),
            cell(&n["p99_ms"], 1),
            n["retries"].as_u64().unwrap_or(0),
        ));
    }
    if routes.is_empty() {
        out.push_str("(no traffic reported in the last minute)\n");
    }
    out.push_str(&format!(
        "\n{:<24} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
        "CLUSTER", "REQ/S", "SUCCESS", "P50 MS", "P99 MS", "RETRIES", "EJECTED"
    ));
    for c in doc["clusters"].as_array().unwrap_or(&empty) {
        let n = &c["now"];
        let ejected = match (c["ejected"].as_u64(), c["endpoints"].as_u64()) {
            (Some(e), Some(t)) => format!("{e}/{t}"),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<24} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
            printable(&c["cluster"]),
            cell(&n["rps"], 2),
            rate(&n["success_rate"]),
            cell(&n["p50_ms"], 1),
            cell(&n["p99_ms"], 1),
            n["retries"].as_u64().unwrap_or(0),
            ejected,
        ));
    }
    out
}

/// A name as a terminal shows it: control characters (an escape sequence a rogue report
/// could carry) replaced.
fn printable(v: &Value) -> String {
    v.as_str()
        .unwrap_or("-")
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

async fn tap_stream(a: &Args) -> Result<(), String> {
    let mut query = Vec::new();
    if let Some(r) = &a.route {
        query.push(format!("route={}", encode(r)));
    }
    if let Some(s) = &a.status {
        query.push(format!("status={s}"));
    }
    let path = format!("/v1/groups/{}/tap?{}", a.remote.group, query.join("&"));
    let mut body = a.remote.get(&path).await?.into_body();
    let mut buf = Vec::new();
    let mut printed = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the tap stream broke: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // heartbeat
            }
            let mut stdout = std::io::stdout().lock();
            if stdout
                .write_all(&line)
                .and_then(|_| stdout.flush())
                .is_err()
            {
                return Ok(()); // the reader went away (a closed pipe)
            }
            printed += 1;
            if a.count.is_some_and(|n| printed >= n) {
                return Ok(());
            }
        }
    }
    Err("the control plane closed the tap stream".into())
}

/// A query value, percent-encoded.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
