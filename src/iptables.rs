//! `spur init-iptables`: sends a pod's TCP traffic through its proxy, transparently.
//!
//! It runs as the `spur-init` init container, as root with NET_ADMIN, in the pod's network
//! namespace, before any other container starts. It writes the `nat` table rules below in
//! `iptables-save` form and hands them to `iptables-restore --noflush`, which applies a
//! table in one transaction: either every rule is in place or none is, so a pod never
//! starts half-intercepted. `--dry-run` prints the same text and changes nothing.
//!
//! ```text
//! PREROUTING -p tcp -> SPUR_INBOUND        connections arriving at the pod
//!   excluded inbound port                  RETURN (admin port: the kubelet's probes)
//!   anything else                          SPUR_IN_REDIRECT: REDIRECT to the inbound port
//! OUTPUT -p tcp -> SPUR_OUTPUT             connections the pod opens
//!   excluded outbound port                 RETURN
//!   proxy uid, over lo, not to 127.0.0.1   SPUR_INBOUND (see below)
//!   other uid, over lo                     RETURN: the app talking to itself
//!   proxy uid                              RETURN: the proxy's own upstream connections
//!   anything else                          SPUR_OUT_REDIRECT: REDIRECT to the outbound port
//! ```
//!
//! Why the loopback rules, as Istio lays them out: the kernel routes a connection to the
//! pod's own IP over `lo`, and locally generated packets never pass PREROUTING. When the
//! proxy forwards to its own pod IP (a headless-service endpoint that is this very pod),
//! the connection is sent through SPUR_INBOUND by hand, so it meets the same inbound
//! listener and the same exclusions as a connection from another pod. The proxy's
//! connection to the application at 127.0.0.1 is left alone, or it would loop.
//!
//! REDIRECT rewrites the destination, so the proxy reads SO_ORIGINAL_DST to learn where a
//! connection was going: listeners with `original_dst: true` route by it (docs/config.md).
//!
//! IPv6: the same rules go to `ip6tables-restore` (loopback `::1`), so a dual-stack pod
//! cannot bypass its proxy over IPv6. With `--ipv6 auto` (the default) that happens when the
//! namespace has a global IPv6 address (a dual-stack pod); `on` always, `off` never. A
//! failure to install them is fatal, as for IPv4: a half-intercepted pod must not start.
//! Redirected IPv6 connections arrive at `::1`, so in dual-stack pods the listeners listen
//! on `[::]` (which takes IPv4 too).
//!
//! A re-run (an init container can run again in the same pod sandbox) replaces the SPUR
//! chains — declaring a chain in iptables-restore input flushes it — and adds the two
//! jumps from PREROUTING and OUTPUT only if `iptables-save` does not show them already.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};

const HELP: &str = "usage: spur init-iptables [--dry-run] [options]

Installs nat rules in this network namespace (a pod's, when run as the spur-init container)
that redirect inbound TCP to the proxy's inbound listener and outbound TCP to its outbound
listener, except traffic of the proxy's own user id and excluded ports. Applied atomically
with `iptables-restore --noflush` (needs root or CAP_NET_ADMIN, and iptables on PATH).

options:
  --dry-run                    print the rules (iptables-save form) and change nothing
  --inbound-port N             inbound listener (default 15006)
  --outbound-port N            outbound listener (default 15001)
  --proxy-uid N                the proxy's user id: its traffic is never redirected (default 1337)
  --skip-ports LIST            comma-separated TCP ports left alone both ways, e.g. 5432,6379
  --skip-inbound-ports LIST    ports of this pod that bypass the proxy (e.g. the admin port)
  --skip-outbound-ports LIST   destination ports that bypass the proxy
  --ipv6 auto|on|off           IPv6 rules too (ip6tables): auto = when this namespace has a
                               global IPv6 address, i.e. a dual-stack pod (default auto)
  --iptables-restore CMD       the restore command (default iptables-restore; e.g.
                               iptables-legacy-restore on nodes without nf_tables); the IPv6
                               one is its ip6tables twin (ip6tables-restore)";

/// Which IP family a rule set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
}

/// Whether to install IPv6 rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6 {
    Auto,
    On,
    Off,
}

/// What to redirect where.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uid: u32,
    pub skip_inbound: Vec<u16>,
    pub skip_outbound: Vec<u16>,
}

/// The jumps from the built-in chains: the only lines that a second run must not repeat.
const JUMPS: [&str; 2] = [
    "-A PREROUTING -p tcp -j SPUR_INBOUND",
    "-A OUTPUT -p tcp -j SPUR_OUTPUT",
];

impl Rules {
    /// The `nat` table in iptables-save form (as `iptables-save -t nat` prints it back), for
    /// `iptables-restore` (IPv4) or `ip6tables-restore` (IPv6).
    pub fn render(&self, family: Family) -> String {
        let (inp, outp, uid) = (self.inbound_port, self.outbound_port, self.proxy_uid);
        let what = match family {
            Family::V4 => "",
            Family::V6 => " (IPv6, ip6tables)",
        };
        let mut r = vec![
            format!("# spur init-iptables{what}: inbound TCP to :{inp}, outbound TCP to :{outp}, proxy uid {uid}"),
            "*nat".into(),
        ];
        for chain in [
            "SPUR_INBOUND",
            "SPUR_IN_REDIRECT",
            "SPUR_OUTPUT",
            "SPUR_OUT_REDIRECT",
        ] {
            r.push(format!(":{chain} - [0:0]"));
        }
        r.extend(JUMPS.map(String::from));
        for port in &self.skip_inbound {
            r.push(format!(
                "-A SPUR_INBOUND -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        r.push("-A SPUR_INBOUND -p tcp -j SPUR_IN_REDIRECT".into());
        r.push(format!(
            "-A SPUR_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inp}"
        ));
        for port in &self.skip_outbound {
            r.push(format!(
                "-A SPUR_OUTPUT -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        r.extend([
            format!(
                "-A SPUR_OUTPUT ! -d {} -o lo -m owner --uid-owner {uid} -j SPUR_INBOUND",
                family.loopback()
            ),
            format!("-A SPUR_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"),
            format!("-A SPUR_OUTPUT -m owner --uid-owner {uid} -j RETURN"),
            "-A SPUR_OUTPUT -j SPUR_OUT_REDIRECT".into(),
            format!("-A SPUR_OUT_REDIRECT -p tcp -j REDIRECT --to-ports {outp}"),
            "COMMIT".into(),
        ]);
        r.join("\n") + "\n"
    }
}

/// Entry point of `spur init-iptables ARGS`.
pub fn main(args: &[String]) -> ExitCode {
    let (rules, opts) = match parse_args(args) {
        Ok(Some(p)) => p,
        Ok(None) => {
            spur_proxy::cli::print_help(HELP);
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!(
                "spur init-iptables: {msg}\n\nRun `spur init-iptables --help` for the options."
            );
            return ExitCode::from(2);
        }
    };
    let v6 = match opts.ipv6 {
        Ipv6::On => true,
        Ipv6::Off => false,
        // A dry run shows what a dual-stack pod gets.
        Ipv6::Auto => opts.dry_run || has_global_ipv6(),
    };
    if opts.dry_run {
        print!("{}", rules.render(Family::V4));
        if v6 {
            print!("{}", rules.render(Family::V6));
        }
        return ExitCode::SUCCESS;
    }
    let mut steps = vec![(Family::V4, opts.restore.clone())];
    if v6 {
        steps.push((Family::V6, ip6_twin(&opts.restore)));
    } else {
        eprintln!("spur init-iptables: no global IPv6 address here: IPv4 rules only (--ipv6 on to add IPv6 ones)");
    }
    for (family, restore) in steps {
        match apply(&rules.render(family), &restore) {
            Ok(applied) => {
                print!("{applied}");
                eprintln!("spur init-iptables: rules applied with {restore} --noflush");
            }
            Err(msg) => {
                eprintln!("spur init-iptables: {msg}");
                if family == Family::V6 {
                    eprintln!("spur init-iptables: this pod has IPv6: without these rules its IPv6 traffic would bypass the proxy (--ipv6 off only where no IPv6 traffic is possible)");
                }
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// The command line besides the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub dry_run: bool,
    pub restore: String,
    pub ipv6: Ipv6,
}

/// `iptables-restore` → `ip6tables-restore`, `iptables-legacy-restore` →
/// `ip6tables-legacy-restore` (a path keeps its directory).
fn ip6_twin(restore: &str) -> String {
    let (dir, base) = match restore.rsplit_once('/') {
        Some((d, b)) => (format!("{d}/"), b),
        None => (String::new(), restore),
    };
    match base.strip_prefix("iptables") {
        Some(rest) => format!("{dir}ip6tables{rest}"),
        None => "ip6tables-restore".to_string(),
    }
}

/// Whether this network namespace has a global-scope IPv6 address (`/proc/net/if_inet6`,
/// scope 00): a dual-stack pod. Loopback and link-local addresses alone do not count.
fn has_global_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|t| global_ipv6_in(&t))
        .unwrap_or(false)
}

fn global_ipv6_in(if_inet6: &str) -> bool {
    // address ifindex prefixlen scope flags name
    if_inet6
        .lines()
        .any(|l| l.split_whitespace().nth(3) == Some("00"))
}

fn parse_args(args: &[String]) -> Result<Option<(Rules, Options)>, String> {
    let mut rules = Rules {
        inbound_port: 15006,
        outbound_port: 15001,
        proxy_uid: 1337,
        skip_inbound: vec![],
        skip_outbound: vec![],
    };
    let mut opts = Options {
        dry_run: false,
        restore: "iptables-restore".to_string(),
        ipv6: Ipv6::Auto,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let list = |v: String| parse_port_list(&v).map_err(|e| format!("{flag}: {e}"));
        match flag {
            "-h" | "--help" => return Ok(None),
            "--dry-run" => opts.dry_run = true,
            "--inbound-port" => rules.inbound_port = parse_port(flag, &value()?)?,
            "--outbound-port" => rules.outbound_port = parse_port(flag, &value()?)?,
            "--proxy-uid" => rules.proxy_uid = parse_uid(flag, &value()?)?,
            "--skip-ports" => {
                let ports = list(value()?)?;
                rules.skip_inbound.extend(&ports);
                rules.skip_outbound.extend(ports);
            }
            "--skip-inbound-ports" => rules.skip_inbound.extend(list(value()?)?),
            "--skip-outbound-ports" => rules.skip_outbound.extend(list(value()?)?),
            "--iptables-restore" => opts.restore = value()?,
            "--ipv6" => {
                opts.ipv6 = match value()?.as_str() {
                    "auto" => Ipv6::Auto,
                    "on" => Ipv6::On,
                    "off" => Ipv6::Off,
                    v => return Err(format!("--ipv6: `{v}` is not auto, on or off")),
                }
            }
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    if rules.inbound_port == rules.outbound_port {
        return Err(format!(
            "--inbound-port and --outbound-port must differ (both {})",
            rules.inbound_port
        ));
    }
    dedup(&mut rules.skip_inbound);
    dedup(&mut rules.skip_outbound);
    Ok(Some((rules, opts)))
}

/// Removes repeats, keeping the first of each.
fn dedup(ports: &mut Vec<u16>) {
    let mut seen = std::collections::HashSet::new();
    ports.retain(|p| seen.insert(*p));
}

/// A TCP port, 1–65535.
pub fn parse_port(flag: &str, text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{flag}: `{text}` is not a port number (1-65535)")),
    }
}

/// The proxy's user id. Not 0: exempting root's traffic would exempt most applications.
pub fn parse_uid(flag: &str, text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(u) if u > 0 => Ok(u),
        _ => Err(format!("{flag}: `{text}` is not a user id above 0")),
    }
}

/// `"5432, 6379"` → `[5432, 6379]`; empty text is an empty list.
pub fn parse_port_list(text: &str) -> Result<Vec<u16>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "`{p}` is not a port number (1-65535); give a comma-separated list like 5432,6379"
            )),
        })
        .collect()
}

pub fn join_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Applies `text` with `restore --noflush`, leaving out the jumps that `iptables-save`
/// shows are already there. Returns the text applied.
fn apply(text: &str, restore: &str) -> Result<String, String> {
    let existing = existing_jumps(restore);
    let text: String = text
        .lines()
        .filter(|l| !existing.iter().any(|j| j == l))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut child = Command::new(restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "`{restore}` not found on PATH: spur-init needs an image with iptables (the Dockerfile's `init` target)"
            ),
            _ => format!("cannot run `{restore}`: {e}"),
        })?;
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes());
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`{restore}` did not finish: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`{restore} --noflush` failed ({}): {}\nnothing was changed: iptables-restore applies the table atomically. It needs root with NET_ADMIN and NET_RAW in the pod's network namespace.",
            out.status,
            stderr.trim()
        ));
    }
    written.map_err(|e| format!("cannot write the rules to `{restore}`: {e}"))?;
    Ok(text)
}

/// The jump lines already present, per `iptables-save -t nat` (the save command beside
/// `restore`). If it cannot tell, none: a duplicate jump is harmless (the SPUR chains
/// either redirect or return), a missing one is not.
fn existing_jumps(restore: &str) -> Vec<&'static str> {
    let Some(save) = restore
        .strip_suffix("-restore")
        .map(|b| format!("{b}-save"))
    else {
        return vec![];
    };
    match Command::new(&save)
        .args(["-t", "nat"])
        .stderr(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let current = String::from_utf8_lossy(&out.stdout);
            JUMPS
                .into_iter()
                .filter(|j| current.lines().any(|l| l.trim_end() == *j))
                .collect()
        }
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_rules() {
        let (rules, opts) = parse_args(&args(&["--dry-run"])).unwrap().unwrap();
        assert!(opts.dry_run);
        assert_eq!(opts.restore, "iptables-restore");
        assert_eq!(opts.ipv6, Ipv6::Auto);
        assert_eq!(
            rules.render(Family::V4),
            "\
# spur init-iptables: inbound TCP to :15006, outbound TCP to :15001, proxy uid 1337
*nat
:SPUR_INBOUND - [0:0]
:SPUR_IN_REDIRECT - [0:0]
:SPUR_OUTPUT - [0:0]
:SPUR_OUT_REDIRECT - [0:0]
-A PREROUTING -p tcp -j SPUR_INBOUND
-A OUTPUT -p tcp -j SPUR_OUTPUT
-A SPUR_INBOUND -p tcp -j SPUR_IN_REDIRECT
-A SPUR_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A SPUR_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j SPUR_INBOUND
-A SPUR_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A SPUR_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A SPUR_OUTPUT -j SPUR_OUT_REDIRECT
-A SPUR_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"
        );
    }

    #[test]
    fn exclusions_come_first_in_their_chain() {
        let a = args(&[
            "--inbound-port=16000",
            "--outbound-port",
            "16001",
            "--proxy-uid",
            "2102",
            "--skip-inbound-ports",
            "9901",
            "--skip-ports",
            "5432, 6379,5432",
            "--skip-outbound-ports=53",
        ]);
        let (rules, opts) = parse_args(&a).unwrap().unwrap();
        assert!(!opts.dry_run);
        assert_eq!(rules.skip_inbound, [9901, 5432, 6379]);
        assert_eq!(rules.skip_outbound, [5432, 6379, 53]);
        let text = rules.render(Family::V4);
        let body: Vec<&str> = text.lines().skip(8).collect();
        assert_eq!(
            body,
            [
                "-A SPUR_INBOUND -p tcp -m tcp --dport 9901 -j RETURN",
                "-A SPUR_INBOUND -p tcp -m tcp --dport 5432 -j RETURN",
                "-A SPUR_INBOUND -p tcp -m tcp --dport 6379 -j RETURN",
                "-A SPUR_INBOUND -p tcp -j SPUR_IN_REDIRECT",
                "-A SPUR_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16000",
                "-A SPUR_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
                "-A SPUR_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
                "-A SPUR_OUTPUT -p tcp -m tcp --dport 53 -j RETURN",
                "-A SPUR_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 2102 -j SPUR_INBOUND",
                "-A SPUR_OUTPUT -o lo -m owner ! --uid-owner 2102 -j RETURN",
                "-A SPUR_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A SPUR_OUTPUT -j SPUR_OUT_REDIRECT",
                "-A SPUR_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        for (a, msg) in [
            (&["--skip-ports", "5432,x"][..], "`x` is not a port number"),
            (&["--skip-ports", "70000"], "`70000` is not a port number"),
            (&["--inbound-port", "0"], "`0` is not a port number"),
            (&["--proxy-uid", "0"], "not a user id above 0"),
            (&["--inbound-port", "15001"], "must differ"),
            (&["--proxy-uid"], "needs a value"),
            (&["--flush"], "unknown option `--flush`"),
            (&["--ipv6", "maybe"], "`maybe` is not auto, on or off"),
        ] {
            let e = parse_args(&args(a)).unwrap_err();
            assert!(e.contains(msg), "{a:?}: {e}");
        }
        assert_eq!(parse_port_list(" ").unwrap(), Vec::<u16>::new());
    }

    #[test]
    fn ipv6_rules_differ_only_in_loopback_and_title() {
        let (rules, opts) = parse_args(&args(&[
            "--ipv6=on",
            "--iptables-restore",
            "/usr/sbin/iptables-legacy-restore",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(opts.ipv6, Ipv6::On);
        assert_eq!(
            ip6_twin(&opts.restore),
            "/usr/sbin/ip6tables-legacy-restore"
        );
        assert_eq!(ip6_twin("iptables-restore"), "ip6tables-restore");
        assert_eq!(ip6_twin("my-restore"), "ip6tables-restore");
        let v4 = rules.render(Family::V4);
        let v6 = rules.render(Family::V6);
        let differ: Vec<(&str, &str)> =
            v4.lines().zip(v6.lines()).filter(|(a, b)| a != b).collect();
        assert_eq!(
            differ,
            [
                (
                    "# spur init-iptables: inbound TCP to :15006, outbound TCP to :15001, proxy uid 1337",
                    "# spur init-iptables (IPv6, ip6tables): inbound TCP to :15006, outbound TCP to :15001, proxy uid 1337"
                ),
                (
                    "-A SPUR_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j SPUR_INBOUND",
                    "-A SPUR_OUTPUT ! -d ::1/128 -o lo -m owner --uid-owner 1337 -j SPUR_INBOUND"
                ),
            ]
        );
    }

    #[test]
    fn only_a_global_ipv6_address_makes_a_pod_dual_stack() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link = "fe80000000000000c8f1d2fffe3a1b2c 02 40 20 80     eth0\n";
        let global = "fd000211001400000000000000000002 02 40 00 80     eth0\n";
        assert!(!global_ipv6_in(""));
        assert!(!global_ipv6_in(&format!("{lo}{link}")));
        assert!(global_ipv6_in(&format!("{lo}{link}{global}")));
    }
}
