//! `spur inject FILE|-`: adds the Spur sidecar and its init container to every workload
//! in a stream of Kubernetes manifests, and prints the stream.
//!
//! The design goal is that the output can always be piped to `kubectl apply -f -` and
//! that running it twice is harmless:
//!
//! - **Documents are handled one by one.** The text is cut at its `---` lines (a YAML
//!   document marker can only stand at the start of a line), each document is parsed with
//!   serde_yaml_ng, and only the workloads that are injected are written anew. Every
//!   other document — Services, ConfigMaps, opted-out or already injected workloads — is
//!   copied byte for byte, comments and quoting included. Comments *inside* an injected
//!   document are lost (a parsed YAML value has none); the comment lines before its
//!   first key are kept.
//! - **Idempotent.** An injected pod template carries `spur.dev/injected: "true"`; such a
//!   template is left alone, so `spur inject` of its own output changes nothing.
//! - **All or nothing.** Any error (unreadable input, invalid YAML, a workload without
//!   containers, a bad annotation) is reported with its document number and nothing is
//!   printed on stdout, so a pipe to kubectl never applies half a file.
//!
//! What is added to a pod, and why as a native sidecar, is in [`pod`] and [`containers`];
//! the group configs `--config-dir` writes, in [`mesh`]; how the output is written so that
//! kubectl reads it back the same, in [`emit`].

mod containers;
mod emit;
mod mesh;
mod pod;

use serde_yaml_ng::{Mapping, Value};
use std::io::Read;
use std::process::ExitCode;

const HELP: &str = "usage: spur inject FILE|- [options]

Reads Kubernetes manifests (a file, or stdin with `-`; several documents separated by
`---`) and prints them with Spur added to every Deployment, StatefulSet, DaemonSet,
ReplicaSet, Job, CronJob and Pod (also inside a `kind: List`):
  - init container `spur-init`: `spur init-iptables`, which redirects the pod's inbound
    TCP to the proxy's inbound port and its outbound TCP to the outbound port (except the
    admin port and the ports the kubelet probes the app on, inbound);
  - native sidecar `spur-proxy` (an init container with restartPolicy: Always, Kubernetes
    1.29+): `spur proxy --control URL --node $(POD_NAME) --group GROUP --admin
    0.0.0.0:ADMIN`, where GROUP is the pod's `app` label, else `app.kubernetes.io/name`,
    else the workload's name;
  - meshed by default: a projected service account token (audience spur) mounted into the
    sidecar and passed as --sa-token-file, so it gets the certificate of the pod's service
    account (spiffe://TD/ns/NS/sa/SA) from the control plane's mesh CA (spur control
    --ca-dir DIR --kubernetes);
  - the annotations prometheus.io/scrape, /port (ADMIN) and /path (/metrics), unless the
    pod template has its own.
Other documents are copied unchanged, byte for byte. Injected documents are rewritten:
comments inside them are lost (the comment lines above them are kept).

With --config-dir DIR, also writes DIR/spur-GROUP.yaml for every group injected: its
config, to PUT to the control plane (/v1/groups/GROUP/config). It terminates mutual TLS
inbound (meshed pods) towards the app's first container port, and routes outbound by
Host to the Services of the input that select injected pods, with mutual TLS to meshed
ones. Without --config-dir, the group configs are yours to write: an inbound listener on
0.0.0.0:INBOUND and an outbound listener on 127.0.0.1:OUTBOUND (no admin block needed).

Annotations (on the workload or on its pod template, which wins):
  spur.dev/inject: disabled        leave this workload alone
  spur.dev/mtls: disabled          a sidecar without identity: plain HTTP in and out
  spur.dev/skip-ports: \"5432,6379\"  TCP ports that bypass the proxy, inbound and outbound
Pod templates annotated `spur.dev/injected: \"true\"` are already injected and left alone,
so injecting twice changes nothing. Pods with hostNetwork: true are skipped.

options:
  --image IMAGE        proxy image (default ghcr.io/spur-mesh/spur:latest, a placeholder:
                       set the image you built and pushed)
  --init-image IMAGE   image of spur-init, which needs iptables (default: IMAGE with `-init`
                       added to its name, e.g. ghcr.io/spur-mesh/spur-init:latest; the
                       Dockerfile's `init` target builds it)
  --control URL        control plane (default http://spur-control.spur-system.svc:7070)
  --inbound-port N     the proxy's inbound listener (default 15006)
  --outbound-port N    the proxy's outbound listener (default 15001)
  --admin-port N       the proxy's admin server, for probes and metrics (default 9901)
  --uid N              the proxy's user id, whose traffic is never redirected (default 1337)
  --token-secret NAME  a Secret holding the control plane's bearer token (key `token`),
                       mounted into the sidecar and passed as --token-file
  --control-ca-secret NAME
                       a Secret holding the CA of an https:// control plane (key `ca.crt`),
                       mounted into the sidecar and passed as --control-ca
  --trust-domain D     the mesh CA's trust domain, for the identities in generated configs
                       (default cluster.local)
  --config-dir DIR     write each injected group's config to DIR/spur-GROUP.yaml

Errors (unreadable input, invalid YAML, a workload without containers) exit 1 and print
nothing on stdout.";

const DEFAULT_IMAGE: &str = "ghcr.io/spur-mesh/spur:latest";
const DEFAULT_CONTROL: &str = "http://spur-control.spur-system.svc:7070";

/// What goes into the injected containers.
#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    pub init_image: String,
    pub control: String,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub uid: u32,
    /// A Secret with the control plane's bearer token (key `token`), mounted into the
    /// sidecar for `--token-file`.
    pub token_secret: Option<String>,
    /// A Secret with the CA of an https control plane (key `ca.crt`), for `--control-ca`.
    pub control_ca_secret: Option<String>,
    /// The mesh CA's trust domain (identities in generated configs).
    pub trust_domain: String,
    /// Where to write the groups' generated configs.
    pub config_dir: Option<std::path::PathBuf>,
}

/// Entry point of `spur inject ARGS`.
pub fn main(args: &[String]) -> ExitCode {
    let (input, opts) = match parse_args(args) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("spur inject: {msg}\n\nRun `spur inject --help` for the options.");
            return ExitCode::from(2);
        }
    };
    let (name, text) = match read_input(&input) {
        Ok(t) => t,
        Err(msg) => {
            eprintln!("spur inject: {msg}");
            return ExitCode::from(1);
        }
    };
    match inject_text(&text, &opts).and_then(|done| write_configs(done, &opts)) {
        Ok((out, report)) => {
            print!("{out}");
            for line in report {
                eprintln!("spur inject: {line}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("spur inject: {name}: {e}");
            }
            ExitCode::from(1)
        }
    }
}

/// With `--config-dir`, writes each group's generated config (before anything is printed,
/// so a failure prints nothing). Returns the output and the lines for stderr.
fn write_configs(done: Injected, opts: &Options) -> Result<(String, Vec<String>), Vec<String>> {
    let Injected {
        out,
        mut report,
        workloads,
        services,
    } = done;
    let Some(dir) = &opts.config_dir else {
        return Ok((out, report));
    };
    let ports = mesh::Ports {
        inbound: opts.inbound_port,
        outbound: opts.outbound_port,
    };
    let mut notes = Vec::new();
    let configs = mesh::configs(
        &workloads,
        &services,
        &ports,
        &opts.trust_domain,
        &mut notes,
    )?;
    std::fs::create_dir_all(dir)
        .map_err(|e| vec![format!("--config-dir {}: {e}", dir.display())])?;
    for (group, text) in configs {
        let path = dir.join(format!("spur-{group}.yaml"));
        std::fs::write(&path, text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        report.push(format!(
            "group {group}: config written to {}",
            path.display()
        ));
    }
    report.extend(notes);
    Ok((out, report))
}

fn parse_args(args: &[String]) -> Result<Option<(String, Options)>, String> {
    let mut input = None;
    let mut image = DEFAULT_IMAGE.to_string();
    let mut init_image = None;
    let mut control = DEFAULT_CONTROL.to_string();
    let (mut inbound, mut outbound, mut admin, mut uid) = (15006, 15001, 9901, 1337);
    let (mut token_secret, mut control_ca_secret) = (None, None);
    let mut trust_domain = "cluster.local".to_string();
    let mut config_dir = None;
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
        match flag {
            "-h" | "--help" => return Ok(None),
            "--image" => image = value()?,
            "--init-image" => init_image = Some(value()?),
            "--control" => control = value()?.trim_end_matches('/').to_string(),
            "--inbound-port" => inbound = crate::iptables::parse_port(flag, &value()?)?,
            "--outbound-port" => outbound = crate::iptables::parse_port(flag, &value()?)?,
            "--admin-port" => admin = crate::iptables::parse_port(flag, &value()?)?,
            "--uid" => uid = crate::iptables::parse_uid(flag, &value()?)?,
            "--token-secret" => token_secret = Some(secret_name(flag, value()?)?),
            "--control-ca-secret" => control_ca_secret = Some(secret_name(flag, value()?)?),
            "--trust-domain" => {
                let v = value()?;
                spur_config::SpiffeId::parse(&format!("spiffe://{v}")).map_err(|_| {
                    format!("--trust-domain: `{v}` is not a trust domain (lowercase letters, digits, ., -, _)")
                })?;
                trust_domain = v;
            }
            "--config-dir" => config_dir = Some(std::path::PathBuf::from(value()?)),
            f if f.starts_with('-') && f != "-" => return Err(format!("unknown option `{f}`")),
            file if input.is_none() => input = Some(file.to_string()),
            extra => return Err(format!("one input only (got `{extra}` too)")),
        }
    }
    let input = input.ok_or("FILE (or - for stdin) is required")?;
    if !control.starts_with("http://") && !control.starts_with("https://") {
        return Err(format!(
            "--control: `{control}` is not an http:// or https:// URL"
        ));
    }
    if control_ca_secret.is_some() && !control.starts_with("https://") {
        return Err("--control-ca-secret goes with an https:// --control URL".into());
    }
    if inbound == outbound || inbound == admin || outbound == admin {
        return Err(format!(
            "the inbound ({inbound}), outbound ({outbound}) and admin ({admin}) ports must differ"
        ));
    }
    let init_image = match init_image {
        Some(i) => i,
        None => default_init_image(&image)?,
    };
    let opts = Options {
        image,
        init_image,
        control,
        inbound_port: inbound,
        outbound_port: outbound,
        admin_port: admin,
        uid,
        token_secret,
        control_ca_secret,
        trust_domain,
        config_dir,
    };
    Ok(Some((input, opts)))
}

/// A Secret's name: a DNS subdomain (lowercase letters, digits, `-`, `.`; at most 253).
fn secret_name(flag: &str, name: String) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "{flag}: `{name}` is not a Secret name (lowercase letters, digits, - and .)"
        ))
    }
}

/// `registry/spur:tag` → `registry/spur-init:tag`: the init image is built from the same
/// Dockerfile (target `init`) and pushed beside the proxy image. A digest names one
/// image's content, so it cannot be carried over: then `--init-image` is required.
fn default_init_image(image: &str) -> Result<String, String> {
    if image.contains('@') {
        return Err(format!(
            "--image `{image}` has a digest: give the init image with --init-image"
        ));
    }
    let name_start = image.rfind('/').map_or(0, |i| i + 1);
    let tag_at = image[name_start..].find(':').map(|i| name_start + i);
    Ok(match tag_at {
        Some(at) => format!("{}-init{}", &image[..at], &image[at..]),
        None => format!("{image}-init"),
    })
}

/// The input's name for messages, and its text.
fn read_input(input: &str) -> Result<(String, String), String> {
    if input == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(("<stdin>".into(), text))
    } else {
        let text =
            std::fs::read_to_string(input).map_err(|e| format!("cannot read {input}: {e}"))?;
        Ok((input.to_string(), text))
    }
}

/// One document of the input: its text (with its `---` line, if any) and where it starts.
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Cuts a YAML stream into documents at its `---` and `...` marker lines. Comment and
/// blank lines before a `---` belong to the document that follows it, as in YAML.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let (mut start, mut first_line, mut has_content) = (0, 1, false);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_start = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        let is_end = bare == "..." || bare.starts_with("... ");
        if is_start && has_content {
            chunks.push(Chunk {
                text: &text[start..offset],
                first_line,
            });
            (start, first_line) = (offset, i + 1);
        }
        offset += line.len();
        if is_end {
            chunks.push(Chunk {
                text: &text[start..offset],
                first_line,
            });
            (start, first_line, has_content) = (offset, i + 2, false);
            continue;
        }
        let trimmed = bare.trim_start();
        has_content |= is_start || !(trimmed.is_empty() || trimmed.starts_with('#'));
    }
    if start < text.len() {
        chunks.push(Chunk {
            text: &text[start..],
            first_line,
        });
    }
    chunks
}

/// What injecting a text made: the output, a line per workload for stderr, and what the
/// generated configs need (the workloads injected, the Services seen).
pub struct Injected {
    pub out: String,
    pub report: Vec<String>,
    workloads: Vec<pod::Workload>,
    services: Vec<mesh::Service>,
}

/// Injects every workload of `text`, or returns every error found.
pub fn inject_text(text: &str, opts: &Options) -> Result<Injected, Vec<String>> {
    let mut out = String::with_capacity(text.len() * 2);
    let (mut report, mut errors) = (Vec::new(), Vec::new());
    let mut found = Found::default();
    for (i, chunk) in split_documents(text).iter().enumerate() {
        let doc = i + 1;
        // Parse with the lines before the document kept as blank lines, so that the
        // parser's line numbers are the file's.
        let padded = format!("{}{}", "\n".repeat(chunk.first_line - 1), chunk.text);
        // Aliases are resolved by the parser; `<<` merge keys must be applied by hand, or a
        // rewritten document would carry a literal `<<` key.
        let parsed = serde_yaml_ng::from_str::<Value>(&padded).and_then(|mut v| {
            v.apply_merge()?;
            Ok(v)
        });
        let mut value = match parsed {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("document {doc}: invalid YAML: {e}"));
                continue;
            }
        };
        let mut lines = Vec::new();
        match inject_value(&mut value, opts, &mut lines, &mut found) {
            Ok(false) => out.push_str(chunk.text),
            Ok(true) => match emit::to_yaml(&value) {
                Ok(yaml) => {
                    out.push_str(&leading_lines(chunk.text));
                    out.push_str(&yaml);
                    // A `...` ends the document; without it the next one would run on.
                    if ends_with_end_marker(chunk.text) {
                        out.push_str("...\n");
                    }
                }
                Err(e) => errors.push(format!("document {doc}: {e}")),
            },
            Err(e) => errors.push(format!("document {doc}: {e}")),
        }
        report.extend(lines.into_iter().map(|l| format!("document {doc}: {l}")));
    }
    if errors.is_empty() {
        Ok(Injected {
            out,
            report,
            workloads: found.workloads,
            services: found.services,
        })
    } else {
        Err(errors)
    }
}

/// The workloads injected and the Services seen so far.
#[derive(Default)]
struct Found {
    workloads: Vec<pod::Workload>,
    services: Vec<mesh::Service>,
}

/// The `---` line and the comment lines above the first key of a document that is
/// rewritten, so that separators and header comments (Helm's `# Source:`) survive.
fn leading_lines(text: &str) -> String {
    let mut kept = String::new();
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let trimmed = bare.trim_start();
        let comment = trimmed.is_empty() || trimmed.starts_with('#');
        let marker = bare == "---" || bare.starts_with("--- #") || bare.starts_with("---\t#");
        if comment || marker {
            kept.push_str(bare);
        } else if bare.starts_with("--- ") || bare.starts_with("---\t") {
            kept.push_str("---"); // content on the marker line: the value below has it
        } else {
            break;
        }
        kept.push('\n');
    }
    kept
}

fn ends_with_end_marker(text: &str) -> bool {
    text.lines()
        .rev()
        .map(str::trim_end)
        .find(|l| !l.is_empty())
        .is_some_and(|l| l == "..." || l.starts_with("... "))
}

/// Injects one document, or each item of a `List`. Returns whether anything changed;
/// errors read `Kind/name: field: message`.
fn inject_value(
    value: &mut Value,
    opts: &Options,
    report: &mut Vec<String>,
    found: &mut Found,
) -> Result<bool, String> {
    let Some(obj) = value.as_mapping_mut() else {
        return Ok(false);
    };
    if let Some(service) = mesh::Service::from_object(obj) {
        found.services.push(service);
        return Ok(false);
    }
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let label = format!("{kind}/{}", name_of(obj));
    if kind == "List" || (kind.ends_with("List") && obj.get("items").is_some()) {
        let Some(items) = obj.get_mut("items").and_then(Value::as_sequence_mut) else {
            return Ok(false);
        };
        let mut changed = false;
        for (i, item) in items.iter_mut().enumerate() {
            let mut lines = Vec::new();
            changed |= inject_value(item, opts, &mut lines, found)
                .map_err(|e| format!("{label}: items[{i}]: {e}"))?;
            report.extend(lines.into_iter().map(|l| format!("items[{i}]: {l}")));
        }
        return Ok(changed);
    }
    let Some(path) = pod::template_path(api_version.as_deref(), &kind) else {
        return Ok(false);
    };
    match pod::inject(obj, path, opts).map_err(|e| format!("{label}: {e}"))? {
        pod::Outcome::Injected(w) => {
            let how = if w.meshed {
                format!(
                    "injected, meshed (identity of service account {}/{})",
                    w.namespace, w.service_account
                )
            } else {
                "injected, not meshed (spur.dev/mtls: disabled)".to_string()
            };
            report.push(format!("{label}: {how}"));
            if !w.probe_ports.is_empty() {
                report.push(format!(
                    "{label}: probe port(s) {} bypass the proxy inbound (the kubelet has no mesh certificate)",
                    crate::iptables::join_ports(&w.probe_ports)
                ));
            }
            found.workloads.push(w);
            Ok(true)
        }
        pod::Outcome::Skipped(why) => {
            report.push(format!("{label}: skipped ({why})"));
            Ok(false)
        }
    }
}

fn name_of(obj: &Mapping) -> String {
    let meta = obj.get("metadata");
    meta.and_then(|m| m.get("name"))
        .or_else(|| meta.and_then(|m| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn options() -> Options {
        parse_args(&["-".to_string()]).unwrap().unwrap().1
    }

    fn texts(input: &str) -> Vec<&str> {
        split_documents(input).iter().map(|c| c.text).collect()
    }

    #[test]
    fn splits_at_marker_lines_only() {
        assert_eq!(texts("a: 1\n---\nb: 2\n"), ["a: 1\n", "---\nb: 2\n"]);
        assert_eq!(texts("# head\n---\na: 1\n"), ["# head\n---\na: 1\n"]);
        assert_eq!(
            texts("---\na: |\n  ---\n---\n\n---\nb: 1"),
            ["---\na: |\n  ---\n", "---\n\n", "---\nb: 1"]
        );
        assert_eq!(texts("a: 1\n...\nb: 2\n"), ["a: 1\n...\n", "b: 2\n"]);
        assert_eq!(
            texts("a: 1\r\n---\r\nb: 2\r\n"),
            ["a: 1\r\n", "---\r\nb: 2\r\n"]
        );
        assert!(texts("").is_empty());
    }

    #[test]
    fn keeps_separator_and_header_comments_of_rewritten_documents() {
        assert_eq!(
            leading_lines("---\n# Source: x.yaml\n\nkind: Pod\n# inner\n"),
            "---\n# Source: x.yaml\n\n"
        );
        assert_eq!(leading_lines("--- {kind: Pod}\n"), "---\n");
    }

    #[test]
    fn init_image_defaults_to_the_image_name_plus_init() {
        for (image, init) in [
            (
                "ghcr.io/spur-mesh/spur:latest",
                "ghcr.io/spur-mesh/spur-init:latest",
            ),
            ("localhost:5000/spur", "localhost:5000/spur-init"),
            ("spur:dev", "spur-init:dev"),
        ] {
            assert_eq!(default_init_image(image).unwrap(), init);
        }
        assert!(default_init_image("spur@sha256:abc")
            .unwrap_err()
            .contains("--init-image"));
    }

    #[test]
    fn rejects_bad_options() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (a, msg) in [
            (&["f", "--uid", "0"][..], "--uid"),
            (&["f", "--admin-port", "15006"], "must differ"),
            (
                &["f", "--control", "ftp://x"],
                "not an http:// or https:// URL",
            ),
            (
                &["f", "--control-ca-secret", "ca"],
                "--control-ca-secret goes with an https:// --control URL",
            ),
            (
                &["f", "--token-secret", "Spur_Token"],
                "is not a Secret name",
            ),
            (&["f", "--inbound-port", "70000"], "--inbound-port"),
            (&["f", "g"], "one input only"),
            (&[], "is required"),
            (&["f", "--colour"], "unknown option"),
        ] {
            let e = parse_args(&args(a)).unwrap_err();
            assert!(e.contains(msg), "{a:?}: {e}");
        }
    }
}
