//! `spur demo`: a proxy in front of two echo backends, `v1` and `v2`, with a sticky canary
//! split and a header route, all in one process. Prints the URLs and curl lines to try.

use spur_proxy::{cli::wait_for_signal, echo, log, Proxy};
use std::net::SocketAddr;
use std::process::ExitCode;

const HELP: &str = "usage: spur demo [--listen ADDR] [--admin ADDR]

Starts two echo backends (v1, v2) and a proxy in front of them (default 127.0.0.1:8080,
admin 127.0.0.1:9901) with a 90/10 canary split, sticky by x-user-id, and a route that
sends `x-user-group: beta` to v2. Serves until Ctrl-C.";

pub fn main(args: &[String]) -> ExitCode {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut admin = "127.0.0.1:9901".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => match it.next() {
                Some(v) => listen = v.clone(),
                None => return usage("--listen needs an address"),
            },
            "--admin" => match it.next() {
                Some(v) => admin = v.clone(),
                None => return usage("--admin needs an address"),
            },
            "-h" | "--help" => {
                println!("{HELP}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown option `{other}`")),
        }
    }
    log::init(None);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(run(listen, admin))
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("spur demo: {msg}\n\n{HELP}");
    ExitCode::from(2)
}

async fn run(listen: String, admin: String) -> ExitCode {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let (v1, _t1) = match echo::start("v1", any).await {
        Ok(x) => x,
        Err(e) => return fail(&format!("cannot start backend v1: {e}")),
    };
    let (v2, _t2) = match echo::start("v2", any).await {
        Ok(x) => x,
        Err(e) => return fail(&format!("cannot start backend v2: {e}")),
    };
    let yaml = format!(
        r#"
node: demo
admin: {{ listen: "{admin}" }}
listeners:
  - name: demo
    listen: "{listen}"
    routes:
      - name: beta-users
        match: {{ headers: [{{ name: x-user-group, value: beta }}] }}
        cluster: v2
      - name: canary
        match: {{ path_prefix: / }}
        split:
          - {{ cluster: v1, weight: 90 }}
          - {{ cluster: v2, weight: 10 }}
        hash_on: header:x-user-id
        timeout: 5s
clusters:
  - {{ name: v1, endpoints: ["{v1}"] }}
  - {{ name: v2, endpoints: ["{v2}"] }}
"#
    );
    let cfg = match spur_config::load(&yaml, Some("demo.yaml")) {
        Ok(c) => c,
        Err(e) => return fail(&format!("demo config is invalid: {e}")),
    };
    let proxy = match Proxy::start(cfg).await {
        Ok(p) => p,
        Err(e) => {
            return fail(&format!(
            "{e}\n(is another `spur demo` running? try --listen 127.0.0.1:0 --admin 127.0.0.1:0)"
        ))
        }
    };
    let url = format!("http://{}", proxy.listener_addr("demo").expect("bound"));
    let admin_url = format!("http://{}", proxy.admin_addr().expect("bound"));
    println!(
        "Spur demo is running.

  proxy     {url}
  admin     {admin_url}   (/metrics /ready /live /config /clusters)
  backends  v1 http://{v1}   v2 http://{v2}

Routes: `x-user-group: beta` goes to v2; everything else is split 90% v1 / 10% v2,
sticky per x-user-id.

Try:
  curl -s {url}/hello -H 'x-user-id: alice'
  curl -s {url}/hello -H 'x-user-group: beta'
  curl -s {admin_url}/metrics | grep spur_requests_total

Ctrl-C to stop."
    );
    wait_for_signal().await;
    proxy.shutdown().await;
    log::flush();
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("spur demo: {msg}");
    ExitCode::from(1)
}
