//! `spur rollout status|start|pause|resume|abort --control URL --group G NAME`: a rollout
//! of a group's config, through the control API (`/v1/groups/{g}/rollouts/{name}`), with
//! the same token as every other call. Every form prints the rollout's status: its state,
//! step and weight, and each verdict with its numbers.

use crate::live::Remote;
use serde_json::Value;
use spur_config::args::Flags;
use std::process::ExitCode;

const USAGE: &str = "usage: spur rollout status|start|pause|resume|abort --control URL --group G
               [--token-file F] [--control-ca F] [--json] NAME

Drives and shows a rollout of the group's config (`rollouts.NAME`): start ramps the canary
through its steps, judging each against the baseline; pause holds the weights; resume goes on
from the current step; abort sends the canary no traffic. Each prints the rollout's status
(with --json, the API's answer as it is).
  --token-file F   the control API's bearer token
  --control-ca F   the CA bundle an https:// control plane's certificate must chain to";

struct Args {
    remote: Remote,
    action: String,
    name: String,
    json: bool,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let (mut url, mut group, mut token_file, mut ca) = (None, None, None, None);
    let mut json = false;
    let mut words = Vec::new();
    let mut f = Flags::new(args);
    while let Some(flag) = f.next_flag() {
        match flag {
            "--control" => url = Some(f.value(flag)?.trim_end_matches('/').to_string()),
            "--group" => group = Some(f.value(flag)?),
            "--token-file" => token_file = Some(f.value(flag)?),
            "--control-ca" => ca = Some(f.value(flag)?),
            "--json" => json = true,
            "-h" | "--help" => return Err(String::new()),
            other if other.starts_with('-') => return Err(format!("unknown option `{other}`")),
            word => words.push(word.to_string()),
        }
    }
    let [action, name] = <[String; 2]>::try_from(words).map_err(|_| {
        "give an action (status, start, pause, resume, abort) and the rollout's NAME"
    })?;
    if !matches!(
        action.as_str(),
        "status" | "start" | "pause" | "resume" | "abort"
    ) {
        return Err(format!(
            "unknown action `{action}` (status, start, pause, resume, abort)"
        ));
    }
    let remote = Remote::from_flags(url, group, token_file, ca)?;
    Ok(Args {
        remote,
        action,
        name,
        json,
    })
}

pub fn main(args: &[String]) -> ExitCode {
    let a = match crate::args_or_exit("rollout", USAGE, parse(args)) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let rt = crate::client_runtime();
    let path = format!("/v1/groups/{}/rollouts/{}", a.remote.group, a.name);
    let answer = rt.block_on(async {
        if a.action == "status" {
            a.remote.json_of(http::Method::GET, &path).await
        } else {
            let path = format!("{path}/{}", a.action);
            a.remote.json_of(http::Method::POST, &path).await
        }
    });
    match answer {
        Ok(doc) if a.json => {
            println!("{doc}");
            ExitCode::SUCCESS
        }
        Ok(doc) => {
            print!("{}", show(&doc));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spur rollout {}: {e}", a.action);
            ExitCode::from(1)
        }
    }
}

/// A terminal's view of a value from the API (control characters replaced).
fn text(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn side(v: &Value) -> String {
    let rate = v["error_rate"]
        .as_f64()
        .map_or("-".into(), |r| format!("{:.1}%", r * 100.0));
    let p99 = v["p99_ms"]
        .as_f64()
        .map_or("-".into(), |p| format!("{p:.1}"));
    format!("{:>8} {:>7} {:>9}", text(&v["requests"]), rate, p99)
}

/// The status as text: a headline, the rollout's settings, and a table of verdicts.
fn show(doc: &Value) -> String {
    let steps = doc["steps"].as_array().map_or(0, Vec::len);
    let mut out = format!(
        "rollout {} (group {}): {}, step {}/{} ({}%)\n",
        text(&doc["name"]),
        text(&doc["group"]),
        text(&doc["state"]),
        text(&doc["step"]),
        steps,
        text(&doc["weight"]),
    );
    if let Some(reason) = doc["reason"].as_str() {
        out.push_str(&format!("reason: {}\n", text(&Value::from(reason))));
    }
    if doc["route"].is_string() {
        let list: Vec<String> = doc["steps"]
            .as_array()
            .map(|s| s.iter().map(|v| format!("{}%", text(v))).collect())
            .unwrap_or_default();
        out.push_str(&format!(
            "route {}, canary {}, steps {}, every {}\n",
            text(&doc["route"]),
            text(&doc["canary"]),
            list.join(" "),
            text(&doc["interval"]),
        ));
    }
    if let Some(n) = doc["waiting_for_requests"]["canary_requests"].as_u64() {
        out.push_str(&format!(
            "waiting for canary requests: {n} of {}\n",
            text(&doc["min_requests"])
        ));
    }
    let verdicts = doc["verdicts"].as_array().cloned().unwrap_or_default();
    if verdicts.is_empty() {
        out.push_str("no verdicts yet\n");
        return out;
    }
    out.push_str(&format!(
        "\n{:<4} {:>6} {:<6} {:>8} {:>7} {:>9}  {:>8} {:>7} {:>9}  REASON\n",
        "STEP", "WEIGHT", "RESULT", "CANARY", "ERRORS", "P99 MS", "BASELINE", "ERRORS", "P99 MS"
    ));
    for v in &verdicts {
        out.push_str(&format!(
            "{:<4} {:>5}% {:<6} {}  {}  {}\n",
            text(&v["step"]),
            text(&v["weight"]),
            text(&v["result"]),
            side(&v["canary"]),
            side(&v["baseline"]),
            text(&v["reason"]),
        ));
    }
    out
}
