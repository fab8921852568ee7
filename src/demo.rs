//! `spur demo`: the whole system in one process. A control plane holds the config of group
//! `demo`; a proxy watches it; two echo backends, `v1` and `v2`, stand behind the proxy.
//! The config has a sticky 90/10 canary split, a feature flag that sends beta users to v2,
//! and two mirrors: /catalog is copied to another instance of the same build (the
//! comparison finds them `same`), /checkout to v2, another version that answers
//! differently on purpose (`differ`). Prints the URLs and curl lines to try, including one
//! that turns the flag off live, and the lines that run a canary rollout of v2 (`rollouts.v2`,
//! idle until started).

use spur_proxy::reload::{spawn_control, ControlSource};
use spur_proxy::{cli::wait_for_signal, echo, log, Proxy};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HELP: &str = "usage: spur demo [--listen ADDR] [--admin ADDR] [--control ADDR]

Starts a control plane (default 127.0.0.1:7070), two echo backends (v1, v2), two
instances of a catalog backend and a proxy (default 127.0.0.1:8080, admin 127.0.0.1:9901)
that watches the control plane. Routes: the flag `new-checkout` (on for
`x-user-group: beta`) sends requests to v2; /catalog goes to catalog and is mirrored to
catalog-next (the same build: the answers compare `same`); /checkout goes to v1 and is
mirrored to v2 (another version: `differ`); everything else is split 90% v1 / 10% v2,
sticky per x-user-id, and the rollout `v2` ramps that split to 100% when started
(`spur rollout start ... v2`). Serves until Ctrl-C.";

pub fn main(args: &[String]) -> ExitCode {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut admin = "127.0.0.1:9901".to_string();
    let mut control = "127.0.0.1:7070".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--listen" => &mut listen,
            "--admin" => &mut admin,
            "--control" => &mut control,
            "-h" | "--help" => {
                spur_proxy::cli::print_help(HELP);
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown option `{other}`")),
        };
        match it.next() {
            Some(v) => *slot = v.clone(),
            None => return usage(&format!("{a} needs an address")),
        }
    }
    let Ok(control) = control.parse::<SocketAddr>() else {
        return usage(&format!(
            "--control: `{control}` is not an address like 127.0.0.1:7070"
        ));
    };
    log::init(None);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(run(listen, admin, control))
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("spur demo: {msg}\n\n{HELP}");
    ExitCode::from(2)
}

/// The addresses of the demo's backends.
struct Backends {
    v1: SocketAddr,
    v2: SocketAddr,
    catalog: SocketAddr,
    catalog_next: SocketAddr,
}

/// What both catalog instances answer: one build, so the mirror finds no difference.
const CATALOG: &str = "{\"items\": [\"tea\", \"cake\"], \"build\": \"2026.11\"}\n";

fn demo_config(listen: &str, admin: &str, b: &Backends) -> String {
    let Backends {
        v1,
        v2,
        catalog,
        catalog_next,
    } = b;
    format!(
        r#"
node: demo
admin: {{ listen: "{admin}" }}
listeners:
  - name: demo
    listen: "{listen}"
    routes:
      - name: new-checkout
        match: {{ flag: new-checkout }}
        cluster: v2
      - name: catalog
        match: {{ path_prefix: /catalog }}
        cluster: catalog
        mirror: {{ cluster: catalog-next, percent: 100 }}
      - name: checkout
        match: {{ path_prefix: /checkout }}
        cluster: v1
        mirror: {{ cluster: v2, percent: 100 }}
      - name: canary
        match: {{ path_prefix: / }}
        split:
          - {{ cluster: v1, weight: 90 }}
          - {{ cluster: v2, weight: 10 }}
        hash_on: header:x-user-id
        timeout: 5s
        retry: {{ attempts: 2, retry_on: [connect-failure, reset, "503"] }}
clusters:
  - {{ name: v1, endpoints: ["{v1}"] }}
  - {{ name: v2, endpoints: ["{v2}"] }}
  - {{ name: catalog, endpoints: ["{catalog}"] }}
  - {{ name: catalog-next, endpoints: ["{catalog_next}"] }}
flags:
  new-checkout:
    enabled: true
    rules:
      - {{ header: x-user-group, values: [beta] }}
rollouts:
  v2:
    route: canary
    canary: v2
    steps: [10, 50, 100]
    interval: 10s
    min_requests: 20
"#
    )
}

async fn run(listen: String, admin: String, control: SocketAddr) -> ExitCode {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let (v1, _t1) = match echo::start("v1", any).await {
        Ok(x) => x,
        Err(e) => return fail(&format!("cannot start backend v1: {e}")),
    };
    let (v2, _t2) = match echo::start("v2", any).await {
        Ok(x) => x,
        Err(e) => return fail(&format!("cannot start backend v2: {e}")),
    };
    let (catalog, _t3) = match echo::start_fixed("catalog", any, CATALOG).await {
        Ok(x) => x,
        Err(e) => return fail(&format!("cannot start backend catalog: {e}")),
    };
    let (catalog_next, _t4) = match echo::start_fixed("catalog-next", any, CATALOG).await {
        Ok(x) => x,
        Err(e) => return fail(&format!("cannot start backend catalog-next: {e}")),
    };
    let backends = Backends {
        v1,
        v2,
        catalog,
        catalog_next,
    };
    let data_dir = std::env::temp_dir().join(format!("spur-demo-{}", std::process::id()));
    let cp = match spur_control::start(spur_control::Options { listen: control, data_dir: data_dir.clone(), ..Default::default() }).await {
        Ok(h) => h,
        Err(e) => return fail(&format!("{e}\n(is another `spur demo` running? try --control 127.0.0.1:0 --listen 127.0.0.1:0 --admin 127.0.0.1:0)")),
    };
    let cfg = match spur_config::load(&demo_config(&listen, &admin, &backends), Some("demo.yaml")) {
        Ok(c) => c,
        Err(e) => return fail(&format!("demo config is invalid: {e}")),
    };
    let _ = cp.control.commit("demo", "put".into(), cfg).await;
    let proxy = Arc::new(match Proxy::idle() {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    });
    let control_url = format!("http://{}", cp.addr);
    spawn_control(
        proxy.clone(),
        ControlSource {
            client: spur_proxy::control_client::client(None).expect("a control client"),
            url: control_url.clone(),
            node: "demo-proxy".into(),
            group: "demo".into(),
            token: None,
        },
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    // The listener's and the admin server's addresses are published one after the other.
    while proxy.listener_addr("demo").is_none() || proxy.admin_addr().is_none() {
        if Instant::now() > deadline {
            return fail(&format!("the proxy could not apply the demo config (is {listen} or {admin} taken? try --listen 127.0.0.1:0 --admin 127.0.0.1:0)"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://{}", proxy.listener_addr("demo").expect("bound"));
    let admin_url = format!("http://{}", proxy.admin_addr().expect("bound"));
    println!(
        "Spur demo is running.

  proxy     {url}
  admin     {admin_url}   (/metrics /ready /live /config /clusters)
  control   {control_url}   (group `demo`)
  console   {control_url}/ui   (mesh, history and flags, traffic, tap)
  backends  v1 http://{v1}   v2 http://{v2}
            catalog http://{catalog}   catalog-next http://{catalog_next}

Routes: the flag `new-checkout` (on for `x-user-group: beta`) sends requests to v2;
/catalog goes to catalog and is mirrored to catalog-next, the same build (the answers
compare `same`); /checkout goes to v1 and is mirrored to v2, another version (`differ`,
on purpose); everything else is split 90% v1 / 10% v2, sticky per x-user-id.

Try:
  curl -s {url}/hello -H 'x-user-id: alice'
  curl -s {url}/checkout -H 'x-user-group: beta'
  curl -s -X PATCH {control_url}/v1/groups/demo/flags/new-checkout -d '{{\"enabled\": false}}'
then the second line again (now v1), and the mirrors:
  curl -s {url}/catalog; curl -s {url}/checkout
  curl -s {admin_url}/metrics | grep -E 'spur_(requests|flag_evaluations|mirror_requests)_total'
and the group's live traffic and sampled requests (or the console's Traffic and Tap pages):
  spur top --control {control_url} --group demo
  spur tap --control {control_url} --group demo
and a canary rollout of v2 on the split (10%, 50%, 100%; each step judged for 10 s on the
proxy's reports against v1), with traffic running meanwhile:
  for i in $(seq 1000); do curl -s -o /dev/null {url}/hello -H \"x-user-id: u$i\"; sleep 0.05; done &
  spur rollout start --control {control_url} --group demo v2
  spur rollout status --control {control_url} --group demo v2

Ctrl-C to stop."
    );
    wait_for_signal().await;
    proxy.shutdown().await;
    drop(cp);
    let _ = std::fs::remove_dir_all(&data_dir);
    log::flush();
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("spur demo: {msg}");
    ExitCode::from(1)
}
