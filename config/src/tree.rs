//! Deserializing a config from a parsed YAML/JSON tree, with the path of every error and
//! messages in words a user knows.
//!
//! Why a deserializer of our own rather than serde_yaml's or serde_json's: errors must name
//! their field path once (serde_yaml adds its own location to messages, so wrapped errors
//! repeated the path), say "a whole number" rather than "u32", and come from a tree that can
//! be edited: [`crate::parse`] neutralises a node that failed ([`SKIPPED`]) and tries again,
//! which is how every error of a file is found, not just the first. A neutralised map entry
//! reads as absent; a neutralised list element is left out (its neighbours keep their
//! indices in error paths).
//!
//! Scalars are read as YAML reads them for a text field: `retry_on: [503]` and `name: 1`
//! give the text `503` and `1`, whether the file was YAML or JSON.

use serde::de::{self, DeserializeSeed, Deserializer, Expected, Unexpected, Visitor};
use serde_yaml_ng::Value;
use std::borrow::Cow;
use std::fmt;

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// `listeners[0].routes[2].retry`.
pub(crate) fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The tag of a neutralised node (user tags are refused before any node is read, so this
/// one is always ours).
pub(crate) const SKIPPED: &str = "spur-skipped";

pub(crate) fn skipped() -> Value {
    Value::Tagged(Box::new(serde_yaml_ng::value::TaggedValue {
        tag: serde_yaml_ng::value::Tag::new(SKIPPED),
        value: Value::Null,
    }))
}

fn is_skipped(v: &Value) -> bool {
    matches!(v, Value::Tagged(t) if t.tag == SKIPPED)
}

/// A deserialization error: where, what, and (for a missing field) which.
#[derive(Debug)]
pub(crate) struct DeError {
    pub path: Option<Vec<Seg>>,
    pub message: String,
    pub missing: Option<&'static str>,
}

impl DeError {
    fn new(message: String) -> DeError {
        DeError {
            path: None,
            message,
            missing: None,
        }
    }

    /// Sets the path, unless a deeper node set it already.
    fn at(mut self, path: &[Seg]) -> DeError {
        if self.path.is_none() {
            self.path = Some(path.to_vec());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::new(msg.to_string())
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        DeError::new(format!("expected {}, found {}", words(exp), found(&unexp)))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        DeError::new(format!("expected {}, found {len} item(s)", words(exp)))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(format!(
            "`{variant}` is not one of: {}",
            expected.join(", ")
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(format!(
            "unknown field `{field}` (the fields here are: {})",
            expected.join(", ")
        ))
    }

    fn missing_field(field: &'static str) -> Self {
        DeError {
            path: None,
            message: format!("`{field}` is missing: it is required here"),
            missing: Some(field),
        }
    }

    fn duplicate_field(field: &'static str) -> Self {
        DeError::new(format!("`{field}` is given twice"))
    }
}

/// What serde's visitors say they expect, in a user's words.
fn words(exp: &dyn Expected) -> String {
    let said = exp.to_string();
    let plain = match said.as_str() {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" | "a borrowed string" | "a character" => "text",
        "a sequence" => "a list",
        "unit" => "nothing",
        s if s.starts_with("struct ") => "a map of settings (`name: value`)",
        s if s.starts_with("a map") => "a map (`name: value`)",
        _ => return said,
    };
    plain.to_string()
}

/// What was found instead, in a user's words.
fn found(unexp: &Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Bool(b) => format!("`{b}`"),
        Unexpected::Unsigned(n) => format!("`{n}`"),
        Unexpected::Signed(n) => format!("`{n}`"),
        Unexpected::Float(n) => format!("`{n}`"),
        Unexpected::Char(c) => format!("`{c}`"),
        Unexpected::Str(s) => format!("`{s}`"),
        Unexpected::Unit | Unexpected::Option => "nothing (an empty value)".into(),
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a map".into(),
        other => other.to_string(),
    }
}

/// Deserializes `T` from `root`; the first error, with its path.
pub(crate) fn from_value<'de, T: de::Deserialize<'de>>(root: &'de Value) -> Result<T, DeError> {
    T::deserialize(Node {
        v: root,
        path: Vec::new(),
    })
}

/// A node of the tree and its path.
struct Node<'de> {
    v: &'de Value,
    path: Vec<Seg>,
}

impl<'de> Node<'de> {
    fn child(&self, seg: Seg, v: &'de Value) -> Node<'de> {
        let mut path = self.path.clone();
        path.push(seg);
        Node { v, path }
    }

    fn tag_error(&self) -> DeError {
        DeError::new("YAML tags (`!name`) are not used in a Spur config".into())
    }

    /// A scalar as text, the way YAML reads a plain scalar into a text field.
    fn scalar_text(&self) -> Option<Cow<'de, str>> {
        match self.v {
            Value::String(s) => Some(Cow::Borrowed(s)),
            Value::Number(n) => Some(Cow::Owned(n.to_string())),
            Value::Bool(b) => Some(Cow::Owned(b.to_string())),
            _ => None,
        }
    }

    fn any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.v {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Sequence(items) => visitor.visit_seq(Items {
                iter: items.iter().enumerate(),
                parent: &self,
            }),
            Value::Mapping(m) => visitor.visit_map(Entries {
                iter: m.iter(),
                parent: &self,
                value: None,
            }),
            Value::Tagged(_) => Err(self.tag_error()),
        }
    }
}

impl<'de> Deserializer<'de> for Node<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let path = self.path.clone();
        self.any(visitor).map_err(|e| e.at(&path))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match self.scalar_text() {
            Some(Cow::Borrowed(s)) => visitor.visit_borrowed_str(s),
            Some(Cow::Owned(s)) => visitor.visit_string(s),
            None => return self.deserialize_any(visitor),
        };
        result.map_err(|e: DeError| e.at(&self.path))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let path = self.path.clone();
        match self.v {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
        .map_err(|e| e.at(&path))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let path = self.path.clone();
        visitor.visit_newtype_struct(self).map_err(|e| e.at(&path))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let result = match self.scalar_text() {
            Some(text) => visitor.visit_enum(de::value::StrDeserializer::<DeError>::new(&text)),
            None => Err(DeError::new(format!(
                "expected one of: {}",
                variants.join(", ")
            ))),
        };
        result.map_err(|e| e.at(&self.path))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct identifier
    }
}

/// The elements of a list, each with its index; neutralised ones are left out.
struct Items<'a, 'de> {
    iter: std::iter::Enumerate<std::slice::Iter<'de, Value>>,
    parent: &'a Node<'de>,
}

impl<'de> de::SeqAccess<'de> for Items<'_, 'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        for (i, v) in self.iter.by_ref() {
            if !is_skipped(v) {
                // A type that checks its value after reading it reports at this path too.
                let node = self.parent.child(Seg::Index(i), v);
                let path = node.path.clone();
                return seed.deserialize(node).map(Some).map_err(|e| e.at(&path));
            }
        }
        Ok(None)
    }
}

/// The entries of a map; neutralised ones read as absent.
struct Entries<'a, 'de> {
    iter: serde_yaml_ng::mapping::Iter<'de>,
    parent: &'a Node<'de>,
    value: Option<Node<'de>>,
}

/// A map key as text (keys are names: a number or boolean key reads as its text).
pub(crate) fn key_text(k: &Value) -> Option<Cow<'_, str>> {
    match k {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Owned(b.to_string())),
        _ => None,
    }
}

impl<'de> de::MapAccess<'de> for Entries<'_, 'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        for (k, v) in self.iter.by_ref() {
            if is_skipped(v) {
                continue;
            }
            let Some(text) = key_text(k) else {
                return Err(DeError::new("a map key must be a name".into()).at(&self.parent.path));
            };
            let node = self.parent.child(Seg::Key(text.to_string()), v);
            let path = node.path.clone();
            self.value = Some(node);
            return seed.deserialize(Key { text, path: &path }).map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let node = self
            .value
            .take()
            .ok_or_else(|| DeError::new("a map value without its key".into()))?;
        let path = node.path.clone();
        seed.deserialize(node).map_err(|e| e.at(&path))
    }
}

/// A map key: a field name (unknown ones are reported at the key's own path) or a name in
/// a map such as `flags`.
struct Key<'a, 'de> {
    text: Cow<'de, str>,
    path: &'a [Seg],
}

impl<'de> Deserializer<'de> for Key<'_, 'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.text {
            Cow::Borrowed(s) => visitor.visit_borrowed_str(s),
            Cow::Owned(s) => visitor.visit_string(s),
        }
        .map_err(|e: DeError| e.at(self.path))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
        #[serde(default)]
        names: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Inner>,
        #[serde(default)]
        on: Option<bool>,
    }

    fn err(yaml: &str) -> (String, String) {
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        let e = from_value::<Outer>(&v).unwrap_err();
        (render(&e.path.unwrap_or_default()), e.message)
    }

    #[test]
    fn errors_have_their_path_once_and_plain_words() {
        assert_eq!(
            err("items: [{ n: 1 }, { n: ninety }]"),
            (
                "items[1].n".into(),
                "expected a whole number from 0 to 4294967295, found `ninety`".into()
            )
        );
        assert_eq!(
            err("items: [{ n: 1, colour: red }]"),
            (
                "items[0].colour".into(),
                "unknown field `colour` (the fields here are: n, names)".into()
            )
        );
        assert_eq!(
            err("items: [{ names: [a] }]"),
            (
                "items[0]".into(),
                "`n` is missing: it is required here".into()
            )
        );
        assert_eq!(
            err("items: [{ n: 1 }]\non: maybe"),
            ("on".into(), "expected true or false, found `maybe`".into())
        );
        assert_eq!(
            err("items: 5"),
            ("items".into(), "expected a list, found `5`".into())
        );
        assert_eq!(err("items: [!x { n: 1 }]").0, "items[0]");
    }

    #[test]
    fn scalars_read_as_text_and_skipped_nodes_are_left_out() {
        let mut v: Value =
            serde_yaml_ng::from_str("items: [{ n: 1, names: [1, true, x] }, { n: bad }, { n: 3 }]")
                .unwrap();
        v["items"][1] = skipped();
        let out: Outer = from_value(&v).unwrap();
        assert_eq!(out.items.len(), 2);
        assert_eq!(out.items[0].names, ["1", "true", "x"]);
        assert_eq!(out.items[1].n, 3);
        v["on"] = skipped();
        assert!(
            from_value::<Outer>(&v).unwrap().on.is_none(),
            "reads as absent"
        );
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Kinds {
        byte: Option<u8>,
        port: Option<u16>,
        big: Option<u64>,
        signed: Option<i32>,
        share: Option<f64>,
        text: Option<String>,
        letter: Option<char>,
        nothing: Option<()>,
        names: Option<std::collections::BTreeMap<String, u32>>,
        inner: Option<Inner>,
        on: Option<bool>,
    }

    /// The message for `field: value` in a [`Kinds`].
    fn said(field: &str, value: &str) -> String {
        let v: Value = serde_yaml_ng::from_str(&format!("{field}: {value}")).unwrap();
        let e = from_value::<Kinds>(&v).unwrap_err();
        assert_eq!(e.to_string(), e.message, "Display is the message");
        e.message
    }

    #[test]
    fn each_expected_kind_and_found_value_is_said_in_words() {
        for (field, value, want) in [
            (
                "byte",
                "[1]",
                "expected a whole number from 0 to 255, found a list",
            ),
            (
                "port",
                "{ a: 1 }",
                "expected a whole number from 0 to 65535, found a map",
            ),
            ("big", "true", "expected a whole number, found `true`"),
            ("signed", "2.5", "expected a whole number, found `2.5`"),
            ("share", "[]", "expected a number, found a list"),
            ("text", "[]", "expected text, found a list"),
            ("letter", "[]", "expected text, found a list"),
            ("nothing", "5", "expected nothing, found `5`"),
            (
                "names",
                "[]",
                "expected a map (`name: value`), found a list",
            ),
            (
                "inner",
                "x",
                "expected a map of settings (`name: value`), found `x`",
            ),
            ("on", "{}", "expected true or false, found a map"),
            (
                "byte",
                "-1",
                "expected a whole number from 0 to 255, found `-1`",
            ),
            (
                "byte",
                "300",
                "expected a whole number from 0 to 255, found `300`",
            ),
        ] {
            assert_eq!(said(field, value), want, "{field}: {value}");
        }
    }

    #[test]
    fn a_number_or_boolean_key_reads_as_its_text() {
        let v: Value = serde_yaml_ng::from_str("names: { 1: 2, true: 3, x: 4 }").unwrap();
        let names = from_value::<Kinds>(&v).unwrap().names.unwrap();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [("1".into(), 2), ("true".into(), 3), ("x".into(), 4)]
        );
        let v: Value = serde_yaml_ng::from_str("names: { [1]: 2 }").unwrap();
        assert_eq!(
            from_value::<Kinds>(&v).unwrap_err().message,
            "a map key must be a name"
        );
    }

    #[test]
    fn an_empty_value_reads_as_absent() {
        for text in ["items: []\non:", "items: []\non: null", "items: []\non: ~"] {
            let v: Value = serde_yaml_ng::from_str(text).unwrap();
            assert_eq!(from_value::<Outer>(&v).unwrap().on, None, "{text}");
        }
    }
}
