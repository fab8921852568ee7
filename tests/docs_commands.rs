//! The docs say only what the binary does (issue 19, item 5): every `spur …` command line
//! in README.md, docs/ and deploy/README.md names a command that exists, and every flag it
//! shows is one that command's `--help` lists. Command lines in shell blocks for `spur
//! proxy` and `spur control` (the two whose options depend on each other) must also pass
//! their real argument parsers as written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a command line was found, for the failure message.
struct Found {
    file: String,
    line: usize,
    text: String,
    /// From a shell block (a command to run), not an inline synopsis with `[...]`.
    runnable: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md"), root().join("deploy/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// How a command can start in a shell line or a code span.
const STARTS: [(&str, &str); 5] = [
    ("cargo run --release -- ", ""),
    ("target/release/spur ", ""),
    ("spur-proxy ", "proxy "),
    ("spur-control ", "control "),
    ("spur ", ""),
];

/// The `spur` command lines in `text` (after `spur`: `proxy --config x`), as found.
fn commands_in(path: &Path, text: &str) -> Vec<Found> {
    let file = path.strip_prefix(root()).unwrap().display().to_string();
    let mut out = Vec::new();
    let mut in_shell = None::<bool>;
    let mut pending = String::new();
    let mut pending_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(lang) = line.strip_prefix("```") {
            in_shell = match in_shell {
                Some(_) => None,
                None => Some(matches!(lang, "sh" | "bash" | "shell" | "console")),
            };
            continue;
        }
        match in_shell {
            Some(true) => {
                if pending.is_empty() {
                    pending_line = i + 1;
                }
                let code = strip_comment(line);
                if let Some(cont) = code.strip_suffix('\\') {
                    pending.push_str(cont);
                    pending.push(' ');
                    continue;
                }
                pending.push_str(code);
                let whole = std::mem::take(&mut pending);
                for segment in whole.split(['|', ';']) {
                    if let Some(cmd) = command_of(segment.trim()) {
                        out.push(Found {
                            file: file.clone(),
                            line: pending_line,
                            text: cmd,
                            runnable: true,
                        });
                    }
                }
            }
            Some(false) => {}
            None => {
                for span in raw.split('`').skip(1).step_by(2) {
                    if let Some(cmd) = command_of(&span.replace("\\|", "|")) {
                        out.push(Found {
                            file: file.clone(),
                            line: i + 1,
                            text: cmd,
                            runnable: false,
                        });
                    }
                }
            }
        }
    }
    out
}

/// A shell comment ends the line (a `#` after whitespace, outside quotes: good enough for
/// the docs' lines).
fn strip_comment(line: &str) -> &str {
    if line.starts_with('#') {
        return "";
    }
    let mut quote = None;
    let bytes = line.as_bytes();
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if i > 0 && bytes[i - 1].is_ascii_whitespace() => {
                return line[..i].trim_end()
            }
            _ => {}
        }
    }
    line
}

/// `proxy --config x` for a segment that runs spur, else `None`.
fn command_of(segment: &str) -> Option<String> {
    let segment = segment.trim_start_matches("$ ").trim();
    for (start, prefix) in STARTS {
        if let Some(rest) = segment.strip_prefix(start) {
            return Some(format!("{prefix}{rest}"));
        }
    }
    None
}

/// The flags a command line shows: `--name` tokens, synopsis brackets and `=value` off.
fn flags(cmd: &str) -> Vec<String> {
    cmd.split_whitespace()
        .map(|t| t.trim_start_matches(['[', '(', '|']))
        .filter(|t| t.starts_with("--") && t.len() > 2)
        .map(|t| {
            let t = t.split('=').next().unwrap();
            t.trim_end_matches([']', ')', '|', ',', '.', '…', '`'])
                .to_string()
        })
        .collect()
}

fn help_of(sub: &str, cache: &mut BTreeMap<String, Option<String>>) -> Option<String> {
    cache
        .entry(sub.to_string())
        .or_insert_with(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_spur"))
                .args([sub, "--help"])
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .clone()
}

/// Whether `help` lists `flag` as a whole word.
fn lists(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let after = help[i + flag.len()..].chars().next();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// Words of a shell command line, quotes removed (the docs' lines need no more).
fn words(cmd: &str) -> Vec<String> {
    cmd.split_whitespace()
        .map(|w| w.trim_matches(['"', '\'']).to_string())
        .collect()
}

#[test]
fn every_spur_command_line_in_the_docs_parses() {
    let mut found = Vec::new();
    for path in doc_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        found.extend(commands_in(&path, &text));
    }
    assert!(
        found.len() >= 40,
        "only {} command lines found",
        found.len()
    );
    let subcommands = [
        "proxy",
        "control",
        "validate",
        "demo",
        "inject",
        "init-iptables",
        "explain",
        "rollout",
        "help",
        "--version",
    ];
    let mut help = BTreeMap::new();
    let mut errors = Vec::new();
    for f in &found {
        let at = format!("{}:{}: `spur {}`", f.file, f.line, f.text);
        let sub = f.text.split_whitespace().next().unwrap_or("");
        if !subcommands.contains(&sub) {
            // Words such as "spur is ..." in prose are not commands.
            if f.runnable || sub.starts_with('-') {
                errors.push(format!("{at}: no command `{sub}`"));
            }
            continue;
        }
        if sub == "help" || sub == "--version" {
            continue;
        }
        let Some(text) = help_of(sub, &mut help) else {
            errors.push(format!("{at}: `spur {sub} --help` fails"));
            continue;
        };
        for flag in flags(&f.text) {
            if !lists(&text, &flag) {
                errors.push(format!("{at}: `spur {sub} --help` does not list {flag}"));
            }
        }
        if f.runnable && matches!(sub, "proxy" | "control") {
            let args: Vec<String> = words(&f.text)[1..].to_vec();
            let parsed = match sub {
                "proxy" => spur_proxy::cli::parse_proxy_args(&args).map(|_| ()),
                _ => spur_control::cli::parse(&args).map(|_| ()),
            };
            if let Err(e) = parsed {
                errors.push(format!("{at}: does not parse: {e}"));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_extraction_finds_what_it_should() {
    let md = "Run `spur proxy --config F [--watch]` or `spur.dev/inject`.\n\n```sh\nspur control --listen 0.0.0.0:7070 \\\n  --token-file t   # a comment --bogus\ncat x | spur inject - --image I\n```\n\n```yaml\nspur proxy --nope\n```\n";
    let found = commands_in(&root().join("README.md"), md);
    let texts: Vec<&str> = found.iter().map(|f| f.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "proxy --config F [--watch]",
            "control --listen 0.0.0.0:7070  --token-file t",
            "inject - --image I"
        ]
    );
    assert_eq!(flags(texts[0]), ["--config", "--watch"]);
    assert!(lists("  --token-file FILE", "--token-file"));
    assert!(!lists("  --token-files", "--token-file"));
}
