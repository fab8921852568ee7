//! Fuzz-style: random and mutated configs (YAML and JSON) through parse, validation and the
//! proxy's compile. Never a panic, never more than a second for one input, and a config
//! that validated compiles (only TLS material, read from files at apply time, may still
//! refuse it). Seeded, so a failure repeats; bounded to a few thousand inputs.

use spur_proxy::metrics::Metrics;
use spur_proxy::registry::Registry;
use spur_proxy::snapshot::Snapshot;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEED: u64 = 0x5eed_c0f1;
const MUTATIONS_PER_EXAMPLE: usize = 600;
const RANDOM_DOCUMENTS: usize = 800;
const LIMIT: Duration = Duration::from_secs(1);

fn examples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 2,
        "config/examples has the standalone and sidecar examples"
    );
    out
}

/// One mutation of `text`: lines deleted, duplicated or swapped, values swapped between
/// lines, bytes replaced or inserted.
fn mutate(rng: &mut fastrand::Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for _ in 0..rng.usize(1..4) {
        if lines.is_empty() {
            break;
        }
        let i = rng.usize(..lines.len());
        let j = rng.usize(..lines.len());
        match rng.u8(..6) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let l = lines[i].clone();
                lines.insert(j, l);
            }
            2 => lines.swap(i, j),
            3 => {
                // Swap the values of two `key: value` lines.
                if let (Some((ka, va)), Some((kb, vb))) =
                    (lines[i].split_once(": "), lines[j].split_once(": "))
                {
                    let (a, b) = (format!("{ka}: {vb}"), format!("{kb}: {va}"));
                    lines[i] = a;
                    lines[j] = b;
                }
            }
            4 => {
                let mut bytes = lines[i].clone().into_bytes();
                if !bytes.is_empty() {
                    let k = rng.usize(..bytes.len());
                    bytes[k] = rng.u8(..);
                }
                lines[i] = String::from_utf8_lossy(&bytes).into_owned();
            }
            _ => {
                let noise = [
                    "[", "]", "{", "}", ":", "- ", "\"", "'", "#", "&a ", "*a", "!t ", "0", "-1",
                    "1e9", "~", "\t", "ms", "::", "%",
                ];
                let k = rng.usize(..=lines[i].len());
                if lines[i].is_char_boundary(k) {
                    lines[i].insert_str(k, noise[rng.usize(..noise.len())]);
                }
            }
        }
    }
    lines.join("\n")
}

/// A random document from YAML and JSON pieces and the schema's words.
fn random_document(rng: &mut fastrand::Rng) -> String {
    let pieces = [
        "listeners",
        "clusters",
        "flags",
        "routes",
        "name",
        "listen",
        "cluster",
        "endpoints",
        "split",
        "weight",
        "retry",
        "retry_on",
        "hash_on",
        "match",
        "headers",
        "regex",
        "tls",
        "allow_identities",
        "authz",
        "rules",
        "action",
        "deny",
        "audit",
        "from",
        "to",
        "identities",
        "namespaces",
        "cidrs",
        "unauthenticated",
        "path_prefixes",
        "grpc",
        "service",
        "10.0.0.0/8",
        "spiffe://td/*",
        "dns",
        "k8s",
        "protocol",
        "http3",
        "tcp",
        ": ",
        ", ",
        "- ",
        "\n",
        "\n  ",
        "\n    ",
        "[",
        "]",
        "{",
        "}",
        "\"",
        "127.0.0.1:8080",
        "0.0.0.0:0",
        "[::]:80",
        "spiffe://td/a",
        "header:x",
        "cookie:c",
        "503",
        "5xx",
        "2s",
        "0ms",
        "64KiB",
        "true",
        "null",
        "-",
        "1",
        "99999999999999999999",
        "(",
        "\\",
        "&x",
        "*x",
        "<<",
        "---",
    ];
    let mut s = String::new();
    for _ in 0..rng.usize(1..80) {
        s.push_str(pieces[rng.usize(..pieces.len())]);
    }
    s
}

/// Parse, validate and (when valid) compile one input: no panic, in time, and a valid
/// config compiles unless its TLS files cannot be loaded.
fn check(input: &str, file: &str, metrics: &Metrics) {
    let started = Instant::now();
    let loaded = catch_unwind(|| spur_config::load(input, Some(file)))
        .unwrap_or_else(|_| panic!("parse or validation panicked on {file}:\n{input}"));
    assert!(
        started.elapsed() < LIMIT,
        "{:?} to validate {file}:\n{input}",
        started.elapsed()
    );
    let Ok(cfg) = loaded else { return };
    let started = Instant::now();
    let registry = Registry::default();
    let compiled = catch_unwind(AssertUnwindSafe(|| {
        Snapshot::compile(Arc::new(cfg), 1, &registry, metrics, None).map(|_| ())
    }))
    .unwrap_or_else(|_| panic!("compile panicked on {file}:\n{input}"));
    assert!(
        started.elapsed() < LIMIT,
        "{:?} to compile {file}:\n{input}",
        started.elapsed()
    );
    if let Err(e) = compiled {
        assert!(
            e.path.contains(".tls"),
            "a config that validated failed to compile ({e}):\n{input}"
        );
    }
}

#[tokio::test]
async fn random_and_mutated_configs_never_panic_or_hang() {
    let started = Instant::now();
    let metrics = Metrics::new();
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut valid = 0;
    let mut inputs = 0;
    for (name, text) in examples() {
        let cfg = spur_config::load(&text, Some(&name)).unwrap();
        let json = serde_json::to_string_pretty(&cfg).unwrap();
        for (base, file) in [
            (&text, name.clone()),
            (&json, name.replace(".yaml", ".json")),
        ] {
            for _ in 0..MUTATIONS_PER_EXAMPLE {
                let input = mutate(&mut rng, base);
                valid += usize::from(spur_config::load(&input, Some(&file)).is_ok());
                check(&input, &file, &metrics);
                inputs += 1;
            }
        }
    }
    for k in 0..RANDOM_DOCUMENTS {
        let input = random_document(&mut rng);
        let file = if k % 2 == 0 { "r.yaml" } else { "r.json" };
        check(&input, file, &metrics);
        inputs += 1;
    }
    // Deep documents, as the hostile-input issue sent them.
    for deep in [
        format!(
            "listeners: {}{}",
            "{a: ".repeat(100_000),
            "}".repeat(100_000)
        ),
        format!("{}x", "- ".repeat(100_000)),
    ] {
        check(&deep, "deep.yaml", &metrics);
        inputs += 1;
    }
    eprintln!(
        "{inputs} inputs ({valid} mutations still valid) in {:?}",
        started.elapsed()
    );
    assert!(
        valid > 50,
        "mutations should leave some configs valid: {valid}"
    );
}
