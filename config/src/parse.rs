//! Reading a config from YAML or JSON text, finding every parse error rather than the first.
//!
//! The text is parsed into a tree (after [`crate::depth`] has checked its nesting), then
//! deserialized by [`crate::tree`]. When that fails at a path, the error is recorded, the
//! node there is neutralised (it then reads as absent; a list element is left out), and
//! deserialization runs again, until it succeeds or [`MAX_ERRORS`] are found. A required
//! field that was neutralised makes its parent fail as "missing"; that consequence is not
//! reported, the parent is neutralised in turn. What a user sees is one error per mistake,
//! at the mistake's path.

use crate::depth;
use crate::tree::{self, key_text, render, skipped, Seg};
use crate::types::Config;
use crate::{ConfigError, FieldError};
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The most parse errors reported for one document.
pub const MAX_ERRORS: usize = 100;

/// The format of a config text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// Picks the format from a file name's extension, or else from the content: JSON starts
    /// with `{`, anything else is read as YAML (of which JSON is nearly a subset anyway).
    pub fn detect(file_name: Option<&str>, text: &str) -> Format {
        if let Some(name) = file_name {
            let lower = name.to_ascii_lowercase();
            if lower.ends_with(".json") {
                return Format::Json;
            }
            if lower.ends_with(".yaml") || lower.ends_with(".yml") {
                return Format::Yaml;
            }
        }
        if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// What reading a text came to: the config (when the tree could be read at all, with bad
/// nodes left out), every parse error, and which list elements were left out (by the path
/// of their list), so that later error paths can be put back in the file's terms.
pub(crate) struct Read {
    pub config: Option<Config>,
    pub errors: Vec<FieldError>,
    pub left_out: BTreeMap<String, BTreeSet<usize>>,
}

impl Read {
    fn fatal(message: String) -> Read {
        Read {
            config: None,
            errors: vec![FieldError {
                path: String::new(),
                message,
            }],
            left_out: BTreeMap::new(),
        }
    }
}

/// Parses a config: `Ok` only when nothing failed to parse; else every parse error.
/// (Cross-field validation is [`crate::validate`]; [`crate::load`] does both.)
pub fn parse(text: &str, format: Format) -> Result<Config, ConfigError> {
    let read = read(text, format);
    match read.config {
        Some(cfg) if read.errors.is_empty() => Ok(cfg),
        _ => Err(ConfigError {
            errors: read.errors,
        }),
    }
}

/// The nesting check, then the tree: the first step of reading a text.
fn tree(text: &str, format: Format) -> Result<Value, String> {
    let parsed = match format {
        Format::Json => {
            depth::check_json(text)?;
            serde_json::from_str::<Value>(text).map_err(|e| e.to_string())
        }
        Format::Yaml => {
            depth::check_yaml(text)?;
            serde_yaml_ng::from_str::<Value>(text).map_err(|e| e.to_string())
        }
    };
    let tree = match parsed {
        Ok(Value::Null) => Value::Mapping(Default::default()),
        Ok(v) => v,
        Err(e) if e.starts_with("recursion limit exceeded") => return Err(depth::too_deep()),
        Err(e) => return Err(format!("not valid {}: {e}", format_name(format))),
    };
    if depth::tree_depth(&tree) > depth::MAX_DEPTH {
        return Err(depth::too_deep());
    }
    Ok(tree)
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Json => "JSON",
        Format::Yaml => "YAML",
    }
}

pub(crate) fn read(text: &str, format: Format) -> Read {
    let mut tree = match tree(text, format) {
        Ok(t) => t,
        Err(message) => return Read::fatal(message),
    };
    let mut read = Read {
        config: None,
        errors: Vec::new(),
        left_out: BTreeMap::new(),
    };
    let mut tagged = Vec::new();
    find_tags(&tree, &mut Vec::new(), &mut tagged);
    if tagged.iter().any(Vec::is_empty) {
        return Read::fatal("YAML tags (`!name`) are not used in a Spur config".into());
    }
    // Paths neutralised so far: a "missing" error for one of them is a consequence.
    let mut gone: BTreeSet<Vec<Seg>> = BTreeSet::new();
    for path in tagged {
        read.errors.push(FieldError {
            path: render(&path),
            message: "YAML tags (`!name`) are not used in a Spur config".into(),
        });
        neutralise(&mut tree, &path, &mut read.left_out);
        gone.insert(path);
    }
    let mut result = tree::from_value::<Config>(&tree);
    while read.errors.len() < MAX_ERRORS {
        let e = match result {
            Ok(cfg) => {
                read.config = Some(cfg);
                return read;
            }
            Err(e) => e,
        };
        let at = e.path.clone().unwrap_or_default();
        if let Some(field) = e.missing {
            let mut field_path = at.clone();
            field_path.push(Seg::Key(field.to_string()));
            if !gone.contains(&field_path) {
                read.errors.push(FieldError {
                    path: render(&field_path),
                    message: "missing: this field is required".into(),
                });
                gone.insert(field_path.clone());
            }
            // A required field that is missing or failed to parse holds a stand-in now, so
            // that the rest of its parent is still read and checked.
            if let Some(next) = fill(&mut tree, &field_path) {
                result = next;
                continue;
            }
        } else {
            read.errors.push(FieldError {
                path: render(&at),
                message: e.message,
            });
        }
        if at.is_empty() || !neutralise(&mut tree, &at, &mut read.left_out) {
            return read;
        }
        gone.insert(at);
        result = tree::from_value::<Config>(&tree);
    }
    read.errors.push(FieldError {
        path: String::new(),
        message: format!("stopped after {MAX_ERRORS} errors; fix these first"),
    });
    read
}

/// Stand-ins for a required field that failed to parse: one of these fits each required
/// field of the schema (a name, a number, an address on port 0, a duration). Validation
/// errors at the field's path are left out (it has a parse error), and port 0 overlaps
/// nothing, so a stand-in adds no error of its own.
fn stand_ins() -> [Value; 5] {
    [
        Value::Number(0.into()),
        Value::String("0ms".into()),
        Value::String("0.0.0.0:0".into()),
        Value::Mapping(Default::default()),
        Value::Sequence(Vec::new()),
    ]
}

/// Puts the first stand-in that reads at `path`; the result of reading with it, or `None`
/// (the node left neutralised) when none fits.
fn fill(tree: &mut Value, path: &[Seg]) -> Option<Result<Config, tree::DeError>> {
    let (Seg::Key(field), parent_path) = path.split_last()? else {
        return None;
    };
    let Value::Mapping(parent) = node(tree, parent_path)? else {
        return None;
    };
    if !parent
        .iter()
        .any(|(k, _)| key_text(k).as_deref() == Some(field.as_str()))
    {
        parent.insert(Value::String(field.clone()), skipped());
    }
    for stand_in in stand_ins() {
        *node(tree, path)? = stand_in;
        let result = tree::from_value::<Config>(tree);
        let fits = match &result {
            Ok(_) => true,
            Err(e) => {
                let at = e.path.clone().unwrap_or_default();
                let missing_here = e.missing.is_some_and(|f| at == parent_path && f == field);
                at != path && !missing_here
            }
        };
        if fits {
            return Some(result);
        }
    }
    *node(tree, path)? = skipped();
    None
}

fn node<'a>(tree: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut n = tree;
    for seg in path {
        n = child(n, seg)?;
    }
    Some(n)
}

/// Paths of the tagged nodes (`!name value`), outermost first.
fn find_tags(v: &Value, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match v {
        Value::Tagged(_) => out.push(path.clone()),
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                find_tags(item, path, out);
                path.pop();
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m {
                path.push(Seg::Key(key_text(k).unwrap_or_default().into_owned()));
                find_tags(item, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Marks the node at `path` as left out. `false` when there is no such node.
fn neutralise(
    tree: &mut Value,
    path: &[Seg],
    left_out: &mut BTreeMap<String, BTreeSet<usize>>,
) -> bool {
    let Some((last, parent_path)) = path.split_last() else {
        return false;
    };
    let mut node = tree;
    for seg in parent_path {
        node = match child(node, seg) {
            Some(n) => n,
            None => return false,
        };
    }
    if let (Value::Sequence(_), Seg::Index(i)) = (&*node, last) {
        left_out.entry(render(parent_path)).or_default().insert(*i);
    }
    match child(node, last) {
        Some(n) => {
            *n = skipped();
            true
        }
        None => false,
    }
}

fn child<'a>(node: &'a mut Value, seg: &Seg) -> Option<&'a mut Value> {
    match (node, seg) {
        (Value::Sequence(items), Seg::Index(i)) => items.get_mut(*i),
        (Value::Mapping(m), Seg::Key(k)) => m
            .iter_mut()
            .find(|(key, _)| key_text(key).as_deref() == Some(k.as_str()))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// A path from validation (whose indices count only the list elements that were read) in
/// the file's terms: each index moved past the elements left out before it.
pub(crate) fn in_file_terms(path: &str, left_out: &BTreeMap<String, BTreeSet<usize>>) -> String {
    if left_out.is_empty() {
        return path.to_string();
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']').map(|c| open + c) else {
            break;
        };
        out.push_str(&rest[..open]);
        match rest[open + 1..close].parse::<usize>() {
            Ok(mut index) => {
                if let Some(gone) = left_out.get(&out) {
                    // The index-th element that was kept.
                    for g in gone {
                        if *g <= index {
                            index += 1;
                        }
                    }
                }
                out.push_str(&format!("[{index}]"));
            }
            Err(_) => out.push_str(&rest[open..=close]),
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Whether two paths are the same field or one lies inside the other.
pub(crate) fn related(a: &str, b: &str) -> bool {
    let inside = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    inside(a, b) || inside(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_format() {
        assert_eq!(Format::detect(Some("a.json"), ""), Format::Json);
        assert_eq!(Format::detect(Some("a.YML"), "{"), Format::Yaml);
        assert_eq!(Format::detect(None, "  {\"listeners\": []}"), Format::Json);
        assert_eq!(Format::detect(Some("conf"), "listeners: []"), Format::Yaml);
    }

    #[test]
    fn paths_are_put_back_in_the_files_terms() {
        let gone: BTreeMap<String, BTreeSet<usize>> = [
            ("listeners".to_string(), [0, 2].into()),
            ("listeners[3].routes".to_string(), [1].into()),
        ]
        .into();
        assert_eq!(
            in_file_terms("listeners[0].name", &gone),
            "listeners[1].name"
        );
        assert_eq!(
            in_file_terms("listeners[1].routes[1].cluster", &gone),
            "listeners[3].routes[2].cluster"
        );
        assert_eq!(in_file_terms("clusters[0]", &gone), "clusters[0]");
        assert_eq!(
            in_file_terms("flags.a[b].rules[0]", &gone),
            "flags.a[b].rules[0]"
        );
        assert!(related("a.b", "a.b") && related("a.b[0].c", "a.b") && related("a", "a.b"));
        assert!(!related("a.bc", "a.b") && !related("a.b", "a.c"));
    }
}
