//! Reading a config from YAML or JSON text. A parse error names the field path where serde
//! stopped (`listeners[0].limits.max_connections: invalid type ...`).

use crate::types::Config;
use crate::FieldError;

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

/// Parses a config. The error is the one place where parsing stopped, with its path.
pub fn parse(text: &str, format: Format) -> Result<Config, FieldError> {
    let result = match format {
        Format::Json => {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                (path, e.into_inner().to_string())
            })
        }
        Format::Yaml => {
            if text.trim().is_empty() {
                return Ok(Config::default());
            }
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                (path, e.into_inner().to_string())
            })
        }
    };
    result.map_err(|(path, message)| FieldError {
        path: if path == "." { String::new() } else { path },
        message,
    })
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
    fn unknown_field_is_an_error_with_its_path() {
        let err = parse(
            "listeners:\n  - name: a\n    listen: 127.0.0.1:1\n    colour: red\n",
            Format::Yaml,
        )
        .unwrap_err();
        assert_eq!(err.path, "listeners[0].colour");
        assert!(
            err.message.contains("unknown field `colour`"),
            "{}",
            err.message
        );

        let err = parse(r#"{"clusters":[{"name":"a","lb":"random"}]}"#, Format::Json).unwrap_err();
        assert_eq!(err.path, "clusters[0].lb");
        assert!(err.message.contains("unknown variant"), "{}", err.message);
    }

    #[test]
    fn yaml_and_json_give_the_same_config() {
        let yaml = "listeners:\n  - { name: a, listen: '127.0.0.1:1', cluster: c }\nclusters:\n  - { name: c, endpoints: ['127.0.0.1:2', { address: '127.0.0.1:3', weight: 2 }], connect_timeout: 250ms }\n";
        let json = r#"{"listeners":[{"name":"a","listen":"127.0.0.1:1","cluster":"c"}],
            "clusters":[{"name":"c","endpoints":["127.0.0.1:2",{"address":"127.0.0.1:3","weight":2}],"connect_timeout":"250ms"}]}"#;
        let a = parse(yaml, Format::Yaml).unwrap();
        let b = parse(json, Format::Json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.clusters[0].endpoints[1].weight(), 2);
        assert_eq!(a.clusters[0].connect_timeout.get().as_millis(), 250);
        // Round trip through JSON keeps everything.
        let dumped = serde_json::to_string(&a).unwrap();
        assert_eq!(parse(&dumped, Format::Json).unwrap(), a);
    }

    #[test]
    fn retry_on_accepts_on_as_alias() {
        let c = parse(
            "listeners:\n  - name: a\n    listen: 127.0.0.1:1\n    routes:\n      - cluster: c\n        retry: { attempts: 3, on: ['503'] }\n",
            Format::Yaml,
        )
        .unwrap();
        let retry = c.listeners[0].routes[0].retry.as_ref().unwrap();
        assert_eq!(retry.retry_on, vec!["503".to_string()]);
    }
}
