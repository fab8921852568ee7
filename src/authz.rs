//! `spur authz explain`: which rule of a listener's authorization policy decides a request
//! (or a tcp connection), and why, without a running proxy.
//!
//! It reads the config as a proxy does (`spur_config::load_file_with`; `k8s:` clusters are
//! accepted, as a control plane's group config has them), builds the listener's
//! policy as the proxy's snapshot does (`listener_policy`, then `Policy::compile`) and asks
//! `Policy::explain`, which runs the proxy's own matching; so what it prints is what the
//! proxy decides, for the same peer and request.

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use spur_config::args::Flags;
use spur_config::{ListenerProtocol, Parsed, SpiffeId};
use spur_proxy::policy::authz::{Asked, Decision, Policy, Subject};
use std::net::IpAddr;
use std::process::ExitCode;

const USAGE: &str = "usage: spur authz explain FILE --listener L [--identity ID] [--source IP]
                          [--method M] [--path P] [--header K:V]...

Prints which rule of listener L's authorization policy (its `authz`, or what
`tls.allow_identities` stands for) decides a request from a peer, and why each rule matches
or not; exits 0 when allowed, 1 when denied, 2 on a usage or config error.
  --identity ID   the peer's verified SPIFFE ID (default: none, an unauthenticated peer)
  --source IP     the peer's address (default 127.0.0.1)
  --method M      default GET;  --path P  default / (a query is ignored, as the proxy does)
  --header K:V    a request header (repeatable)
A tcp listener decides per connection: give only --identity and --source. The config is
checked as `spur validate --kubernetes` does (k8s: clusters are accepted).";

struct Args {
    file: String,
    listener: String,
    identity: Option<SpiffeId>,
    source: IpAddr,
    method: Option<Method>,
    path: Option<PathAndQuery>,
    headers: HeaderMap,
}

pub fn main(args: &[String]) -> ExitCode {
    match args.split_first() {
        Some((cmd, rest)) if cmd == "explain" => explain(rest),
        Some((flag, _)) if flag == "-h" || flag == "--help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn explain(args: &[String]) -> ExitCode {
    let a = match crate::args_or_exit("authz explain", USAGE, parse_args(args)) {
        Ok(a) => a,
        Err(code) => return code,
    };
    // A group's config for `spur control --kubernetes` (with `k8s:` clusters) is explained
    // too: clusters play no part in a policy.
    let rules = spur_config::Rules {
        k8s_discovery: true,
        ..Default::default()
    };
    let cfg = match spur_config::load_file_with(std::path::Path::new(&a.file), rules) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {} error(s)", a.file, e.errors.len());
            for err in &e.errors {
                eprintln!("  {err}");
            }
            return ExitCode::from(2);
        }
    };
    let Some(l) = cfg.listeners.iter().find(|l| l.name == a.listener) else {
        let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
        eprintln!(
            "spur authz explain: {} has no listener `{}` (it has: {})",
            a.file,
            a.listener,
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    let tcp = l.protocol == ListenerProtocol::Tcp;
    if tcp && (a.method.is_some() || a.path.is_some() || !a.headers.is_empty()) {
        eprintln!(
            "spur authz explain: listener `{}` is tcp: it decides per connection, from \
             --identity and --source only (no --method, --path or --header)",
            l.name
        );
        return ExitCode::from(2);
    }
    let who = Subject {
        identity: a.identity.as_ref().map(SpiffeId::as_str),
        addr: a.source,
    };
    let method = a.method.clone().unwrap_or(Method::GET);
    let path = a
        .path
        .clone()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let asked = (!tcp).then(|| Asked {
        method: &method,
        path: path.path(),
        headers: &a.headers,
    });
    print!(
        "listener {} ({}); ",
        l.name,
        if tcp { "tcp" } else { "http" }
    );
    match &a.identity {
        Some(id) => print!("identity {id}; "),
        None => print!("no verified identity; "),
    }
    print!("source {}", a.source);
    match &asked {
        Some(r) => println!("; {} {}", r.method, r.path),
        None => println!("; a connection"),
    }
    let Some(authz) = spur_config::listener_policy(l) else {
        println!(
            "allow: the listener has no authorization policy (no authz, no tls.allow_identities)"
        );
        return ExitCode::SUCCESS;
    };
    if l.authz.is_none() {
        println!("(the policy tls.allow_identities stands for: one allow rule and default: deny)");
        if tcp {
            println!("(on a tcp listener the TLS handshake already refuses identities outside it)");
        }
    }
    let policy = Policy::compile(&authz);
    let explanation = policy.explain(who, asked);
    print!("{explanation}");
    match explanation.verdict.decision {
        Decision::Allow => ExitCode::SUCCESS,
        Decision::Deny => ExitCode::from(1),
    }
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut file = None;
    let mut listener = None;
    let mut a = Args {
        file: String::new(),
        listener: String::new(),
        identity: None,
        source: IpAddr::from([127, 0, 0, 1]),
        method: None,
        path: None,
        headers: HeaderMap::new(),
    };
    let mut flags = Flags::new(args);
    while let Some(flag) = flags.next_flag() {
        let mut value = |name: &str| flags.value(name);
        match flag {
            "--listener" => listener = Some(value("--listener")?),
            "--identity" => {
                let v = value("--identity")?;
                a.identity = Some(SpiffeId::parse(&v).map_err(|e| format!("--identity: {e}"))?);
            }
            "--source" => {
                let v = value("--source")?;
                a.source = v
                    .parse()
                    .map_err(|_| format!("--source: `{v}` is not an IP address"))?;
            }
            "--method" => {
                let v = value("--method")?;
                let m = Parsed::<Method>::parse(&v).map_err(|e| format!("--method: {e}"))?;
                a.method = Some(m.get().clone());
            }
            "--path" => {
                let v = value("--path")?;
                let p: PathAndQuery = v
                    .parse()
                    .ok()
                    .filter(|p: &PathAndQuery| p.path().starts_with('/'))
                    .ok_or_else(|| format!("--path: `{v}` is not a path such as /api/items"))?;
                a.path = Some(p);
            }
            "--header" => {
                let v = value("--header")?;
                let (name, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--header: `{v}` is not NAME:VALUE"))?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("--header: `{name}` is not a header name"))?;
                let val = HeaderValue::from_str(val.trim())
                    .map_err(|_| format!("--header: the value of `{name}` is not valid"))?;
                a.headers.append(name, val);
            }
            "-h" | "--help" => return Err(String::new()),
            other if other.starts_with('-') => return Err(format!("unknown option `{other}`")),
            positional => {
                if file.replace(positional.to_string()).is_some() {
                    return Err(format!("one config FILE only (`{positional}` is another)"));
                }
            }
        }
    }
    a.file = file.ok_or("the config FILE is required")?;
    a.listener = listener.ok_or("--listener L is required")?;
    Ok(a)
}
