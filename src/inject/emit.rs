//! Writes a YAML value the way `kubectl` reads it.
//!
//! Why not `serde_yaml_ng::to_string`? It decides whether a string needs quotes by asking
//! its own YAML 1.2 parser, so the strings `yes`, `no`, `on`, `off`, `y` and `n` come out
//! bare. `kubectl` (sigs.k8s.io/yaml, a fork of go-yaml v2) reads YAML 1.1, where those
//! words are booleans: an env var `value: "yes"` written back as `value: yes` makes
//! `kubectl apply` fail with "cannot unmarshal bool into ... string". Octal (`0755`),
//! sexagesimal (`1:20`) and timestamps differ between the two versions too.
//!
//! So this emitter is conservative: a string is written bare only when it is plainly a
//! string under both YAML 1.1 and 1.2 (`web`, `apps/v1`, `nginx:1.25`, `--group`, `50m`,
//! `$(POD_NAME)`); anything else is double-quoted. Multi-line strings (shell scripts in
//! `args`) become literal blocks (`|`) where YAML can represent them exactly. The layout is
//! kubectl's: two-space indent, list items at their key's indent, `{}`/`[]` for empty
//! collections. [`to_yaml`] re-parses its own output and refuses to return text that does
//! not read back as the same value, so a bug here cannot silently change a manifest.

use serde_yaml_ng::{Mapping, Value};
use std::fmt::Write;

/// One YAML document (no `---`), ending with a newline.
pub fn to_yaml(value: &Value) -> Result<String, String> {
    let mut out = String::new();
    match value {
        Value::Mapping(m) if !m.is_empty() => mapping(&mut out, m, 0)?,
        Value::Sequence(s) if !s.is_empty() => sequence(&mut out, s, 0)?,
        other => {
            out.push_str(&inline(other)?);
            out.push('\n');
        }
    }
    match serde_yaml_ng::from_str::<Value>(&out) {
        Ok(back) if back == *value => Ok(out),
        Ok(_) => Err("internal error: the YAML written does not read back the same".into()),
        Err(e) => Err(format!(
            "internal error: the YAML written does not parse: {e}"
        )),
    }
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn mapping(out: &mut String, m: &Mapping, indent: usize) -> Result<(), String> {
    for (k, v) in m {
        pad(out, indent);
        out.push_str(&inline(k)?);
        out.push(':');
        match v {
            Value::Mapping(inner) if !inner.is_empty() => {
                out.push('\n');
                mapping(out, inner, indent + 2)?;
            }
            Value::Sequence(items) if !items.is_empty() => {
                out.push('\n');
                sequence(out, items, indent)?;
            }
            Value::String(s) if literal_block_ok(s) => literal_block(out, s, indent + 2),
            other => {
                out.push(' ');
                out.push_str(&inline(other)?);
                out.push('\n');
            }
        }
    }
    Ok(())
}

fn sequence(out: &mut String, items: &[Value], indent: usize) -> Result<(), String> {
    for item in items {
        match item {
            // A collection item starts on the dash's line: write it two columns in, then
            // put the dash over the first line's indentation.
            Value::Mapping(m) if !m.is_empty() => {
                let start = out.len();
                mapping(out, m, indent + 2)?;
                out.replace_range(start + indent..start + indent + 2, "- ");
            }
            Value::Sequence(s) if !s.is_empty() => {
                let start = out.len();
                sequence(out, s, indent + 2)?;
                out.replace_range(start + indent..start + indent + 2, "- ");
            }
            Value::String(s) if literal_block_ok(s) => {
                pad(out, indent);
                out.push('-');
                literal_block(out, s, indent + 2);
            }
            other => {
                pad(out, indent);
                out.push_str("- ");
                out.push_str(&inline(other)?);
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// A scalar or an empty collection, on one line.
fn inline(v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if plain_ok(s) => s.clone(),
        Value::String(s) => double_quoted(s),
        Value::Mapping(m) if m.is_empty() => "{}".into(),
        Value::Sequence(s) if s.is_empty() => "[]".into(),
        Value::Tagged(t) => return Err(format!("YAML tags (`{}`) are not supported", t.tag)),
        Value::Mapping(_) | Value::Sequence(_) => {
            return Err("a collection used as a mapping key is not supported".into())
        }
    })
}

/// Words that YAML 1.1 reads as booleans or null (compared case-insensitively).
const RESERVED: &[&str] = &[
    "y", "n", "yes", "no", "true", "false", "on", "off", "null", "~",
];

/// True when `s` reads back as this same string, bare, under YAML 1.1 and 1.2.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_./:$()=+~@, ".contains(c);
    if !s.chars().all(allowed)
        || s.trim() != s
        || s.ends_with(':')
        || s.contains(": ")
        || RESERVED.iter().any(|w| w.eq_ignore_ascii_case(s))
    {
        return false;
    }
    match first {
        // `-x` is fine; `-`, `- x`, `-1`, `-.5` are not.
        '-' => s[1..]
            .chars()
            .next()
            .is_some_and(|c| c != ' ' && c != '.' && !c.is_ascii_digit()),
        // Digits only as a quantity like `50m`, `32Mi`, `10s`: never a number in either
        // version (no `0x`/`0o` prefix, no exponent, no `:` or `-` of times and dates).
        '1'..='9' => {
            let letters = s.trim_start_matches(|c: char| c.is_ascii_digit());
            !letters.is_empty() && letters.chars().all(|c| c.is_ascii_alphabetic())
        }
        c => c.is_ascii_alphabetic() || "/_$(".contains(c),
    }
}

fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            // NEL, LS, PS and BOM are line breaks or invisible in YAML: escape them too.
            '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A literal block keeps every character as written, so it fits a multi-line string of
/// printable text whose first line does not start with a space (that would need an
/// indentation indicator) and that is more than line breaks.
fn literal_block_ok(s: &str) -> bool {
    s.contains('\n')
        && !s.trim_end_matches('\n').is_empty()
        && !s.starts_with(' ')
        && !s.starts_with('\n')
        && s.chars()
            .all(|c| c == '\n' || (!c.is_control() && c != '\u{feff}'))
        && !s.contains(['\u{85}', '\u{2028}', '\u{2029}'])
}

/// ` |`, ` |-` or ` |+` after the key or dash, then the lines at `indent`.
fn literal_block(out: &mut String, s: &str, indent: usize) {
    let body = s.trim_end_matches('\n');
    let chomp = match s.len() - body.len() {
        0 => "-", // strip: no final line break
        1 => "",  // clip: exactly one
        _ => "+", // keep: all of them
    };
    out.push_str(" |");
    out.push_str(chomp);
    out.push('\n');
    for line in body.split('\n') {
        if !line.is_empty() {
            pad(out, indent);
            out.push_str(line);
        }
        out.push('\n');
    }
    for _ in 1..s.len() - body.len() {
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(yaml: &str) -> String {
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        to_yaml(&v).unwrap()
    }

    #[test]
    fn writes_kubectl_layout() {
        let text = "a:\n  b: 1\n  c:\n  - x\n  - name: web\n    image: nginx:1.25\n  - - nested\n  d: {}\n  e: []\n";
        assert_eq!(round_trip(text), text);
    }

    #[test]
    fn quotes_what_yaml_1_1_would_misread() {
        for s in [
            "yes",
            "No",
            "on",
            "OFF",
            "y",
            "true",
            "null",
            "~",
            "",
            "1",
            "0755",
            "1:20",
            "1e3",
            "0x1f",
            ".5",
            "-1",
            "2024-01-01",
            "-",
            "- x",
            "a: b",
            "a #b",
            " x",
            "x ",
            "*x",
            "&x",
            "!x",
            "%x",
            "@x",
            "'x'",
            "\"x\"",
            "x:",
            "{x}",
            "[x]",
            "|",
            ">",
            "#x",
            "?x",
        ] {
            let out = to_yaml(&Value::String(s.into())).unwrap();
            assert!(out.starts_with('"'), "`{s}` must be quoted, got {out}");
        }
        for s in [
            "web",
            "apps/v1",
            "nginx:1.25",
            "--group",
            "50m",
            "32Mi",
            "$(POD_NAME)",
            "/ready",
            "metadata.name",
            "http://spur-control.spur-system.svc:7070",
            "spur.dev/inject",
            "hello world",
            "a,b",
        ] {
            assert_eq!(to_yaml(&Value::String(s.into())).unwrap(), format!("{s}\n"));
        }
    }

    #[test]
    fn multi_line_strings_become_literal_blocks_exactly() {
        // Each string as the value of `k` and as the item of `l`, and the exact text.
        let cases: [(&str, &str); 5] = [
            // One final line break: clip (`|`).
            (
                "echo a\necho b\n",
                "k: |\n  echo a\n  echo b\nl:\n- |\n  echo a\n  echo b\n",
            ),
            // None: strip (`|-`).
            ("a\nb", "k: |-\n  a\n  b\nl:\n- |-\n  a\n  b\n"),
            // Several, and an empty line inside: keep (`|+`), empty lines unindented.
            (
                "a\n\nb\n\n\n",
                "k: |+\n  a\n\n  b\n\n\nl:\n- |+\n  a\n\n  b\n\n\n",
            ),
            // A first line starting with a space would need an indentation indicator:
            // double-quoted instead.
            (
                "  indented\nx\n",
                "k: \"  indented\\nx\\n\"\nl:\n- \"  indented\\nx\\n\"\n",
            ),
            // A tab is a control character: double-quoted, escaped.
            (
                "tab\there\n",
                "k: \"tab\\there\\n\"\nl:\n- \"tab\\there\\n\"\n",
            ),
        ];
        for (s, expected) in cases {
            let mut m = Mapping::new();
            m.insert("k".into(), Value::String(s.into()));
            m.insert("l".into(), Value::Sequence(vec![Value::String(s.into())]));
            assert_eq!(to_yaml(&Value::Mapping(m)).unwrap(), expected, "{s:?}");
        }
        assert_eq!(
            round_trip("args:\n- |\n  set -e\n  run\n"),
            "args:\n- |\n  set -e\n  run\n"
        );
    }

    #[test]
    fn escapes_control_characters() {
        let v = Value::String("a\u{7}b\"c\\".into());
        assert_eq!(to_yaml(&v).unwrap(), "\"a\\x07b\\\"c\\\\\"\n");
    }

    #[test]
    fn refuses_tags() {
        let v: Value = serde_yaml_ng::from_str("a: !custom 1").unwrap();
        assert!(to_yaml(&v).unwrap_err().contains("tags"));
    }
}
