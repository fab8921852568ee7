//! Refusing deeply nested documents before they are parsed.
//!
//! Why before: libyaml's scanner keeps a record per open flow collection and walks all of
//! them for every token, so `{a: {a: {a: …` nested 100,000 deep (200 KB) costs it a minute,
//! and every nesting limit of a deserializer applies only after the scanner is done.
//!
//! How: for YAML, libyaml's own scanner is run token by token, counting the collections
//! that open and close, and stopped as soon as the depth passes [`MAX_DEPTH`]. Its cost per
//! token is bounded by the depth, so this is linear, and it reads the text exactly as the
//! parser will (a hand-written scanner that misread a quote or a comment could be fooled
//! into counting too shallow). For JSON a byte scan is exact. A Spur config is a handful of
//! levels deep; 64 leaves ample room.

use serde_yaml_ng::Value;

/// The deepest nesting accepted, in YAML or JSON.
pub const MAX_DEPTH: usize = 64;

/// The message for a document nested deeper than [`MAX_DEPTH`].
pub fn too_deep() -> String {
    format!("the document is nested more than {MAX_DEPTH} levels deep")
}

/// `Err` when the JSON text nests deeper than [`MAX_DEPTH`]. Brackets inside strings do not
/// count; the text need not be valid (the parser reports that).
pub fn check_json(text: &str) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// `Err` when the YAML text nests deeper than [`MAX_DEPTH`], by libyaml's own tokens. A
/// syntax error ends the scan with `Ok`: the parser stops at the same token and says why.
pub fn check_yaml(text: &str) -> Result<(), String> {
    use unsafe_libyaml::*;
    // SAFETY: the parser is initialised before use and deleted once; it reads `text`, which
    // outlives it; each token is deleted after it is read, and only its type is read.
    unsafe {
        let mut parser = std::mem::MaybeUninit::<yaml_parser_t>::uninit();
        if yaml_parser_initialize(parser.as_mut_ptr()).fail {
            return Err("out of memory while reading the document".into());
        }
        let parser = parser.as_mut_ptr();
        yaml_parser_set_input_string(parser, text.as_ptr(), text.len() as _);
        let mut depth = 0usize;
        let result = loop {
            let mut token = std::mem::MaybeUninit::<yaml_token_t>::uninit();
            if yaml_parser_scan(parser, token.as_mut_ptr()).fail {
                break Ok(());
            }
            let token = token.as_mut_ptr();
            let kind = (*token).type_;
            yaml_token_delete(token);
            match kind {
                YAML_STREAM_END_TOKEN => break Ok(()),
                YAML_FLOW_SEQUENCE_START_TOKEN
                | YAML_FLOW_MAPPING_START_TOKEN
                | YAML_BLOCK_SEQUENCE_START_TOKEN
                | YAML_BLOCK_MAPPING_START_TOKEN => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        break Err(too_deep());
                    }
                }
                YAML_FLOW_SEQUENCE_END_TOKEN
                | YAML_FLOW_MAPPING_END_TOKEN
                | YAML_BLOCK_END_TOKEN => depth = depth.saturating_sub(1),
                _ => {}
            }
        };
        yaml_parser_delete(parser);
        result
    }
}

/// The depth of a parsed tree: a scalar is 0, a list or map one more than its deepest
/// member. (Checked after parsing as well: a YAML list written under a key without
/// indentation opens no token of its own.)
pub fn tree_depth(v: &Value) -> usize {
    match v {
        Value::Sequence(items) => 1 + items.iter().map(tree_depth).max().unwrap_or(0),
        Value::Mapping(m) => 1 + m.values().map(tree_depth).max().unwrap_or(0),
        Value::Tagged(t) => tree_depth(&t.value),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_documents_are_refused_in_milliseconds() {
        let n = 100_000;
        let flow_maps = format!("{}{}", "{a: ".repeat(n), "}".repeat(n));
        let flow_lists = format!("{}{}", "[".repeat(n), "]".repeat(n));
        let block_lists = format!("{}x", "- ".repeat(n));
        let block_maps: String = (0..3000)
            .map(|i| format!("{}a:\n", " ".repeat(i)))
            .collect();
        // Quoted brackets that a naive scan would count as closing do not hide the depth.
        let quoted_closers = format!("{}1", "[\"]\", ".repeat(n));
        for text in [
            &flow_maps,
            &flow_lists,
            &block_lists,
            &block_maps,
            &quoted_closers,
        ] {
            let t = std::time::Instant::now();
            assert_eq!(check_yaml(text), Err(too_deep()));
            assert!(t.elapsed().as_millis() < 200, "{:?}", t.elapsed());
        }
        let json = format!(
            "{{\"a\": \"]]]\", \"b\": {}1{}}}",
            "[".repeat(n),
            "]".repeat(n)
        );
        assert_eq!(check_json(&json), Err(too_deep()));
    }

    #[test]
    fn the_json_limit_is_inclusive_and_closing_brackets_count_down() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check_json(&nested(MAX_DEPTH)).is_ok());
        assert!(check_json(&nested(MAX_DEPTH + 1)).is_err());
        let siblings = format!("[{}[]]", "{},".repeat(2 * MAX_DEPTH));
        assert!(check_json(&siblings).is_ok());
    }

    #[test]
    fn ordinary_documents_pass_and_brackets_in_text_do_not_count() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert_eq!(check_yaml(&ok), Ok(()));
        assert_eq!(check_json(&ok), Ok(()));
        let many_regexes: String = (0..200)
            .map(|i| format!("- {{ name: x{i}, regex: \"^[[[[{{{{\" }}  # [[[[\n"))
            .collect();
        assert_eq!(check_yaml(&many_regexes), Ok(()));
        let literal = format!("a: |\n{}b: 1\n", "  [[[[[[[[[[[[[[[[[[[[\n".repeat(10));
        assert_eq!(check_yaml(&literal), Ok(()));
        let json: String = format!("[{}]", vec!["\"[[[[[[[[[[\""; 100].join(","));
        assert_eq!(check_json(&json), Ok(()));
        assert_eq!(
            check_yaml("a: [unclosed"),
            Ok(()),
            "a syntax error is the parser's to report"
        );
    }

    #[test]
    fn tree_depth_counts_collections() {
        let v: Value = serde_yaml_ng::from_str("a: [1, {b: [2]}]").unwrap();
        assert_eq!(tree_depth(&v), 4);
        let tagged: Value = serde_yaml_ng::from_str("a: !t [[1]]").unwrap();
        assert_eq!(tree_depth(&tagged), 3, "a tag hides no depth");
    }

    #[test]
    fn escaped_quotes_stay_inside_strings_and_the_yaml_limit_is_inclusive() {
        let brackets = "[".repeat(MAX_DEPTH + 1);
        assert!(check_json(&format!("[\"\\\"{brackets}\"]")).is_ok());
        assert!(check_json(&format!("[\"\\\\\", {brackets}")).is_err());
        let flow = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check_yaml(&flow(MAX_DEPTH)).is_ok());
        assert!(check_yaml(&flow(MAX_DEPTH + 1)).is_err());
    }
}
