//! spur-config: what the user wrote. Schema types, parsing (YAML and JSON), validation.
//!
//! Pure: no sockets, no runtime. The proxy and the control plane both call [`load`] (or
//! [`validate`] on a config they already hold) and act only on a config that passed.

pub mod args;
mod parse;
pub mod spiffe;
mod types;
mod units;
mod validate;

pub use parse::{parse, Format};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use types::*;
pub use units::{ByteSize, Duration};
pub use validate::K8S_NEEDS_DISCOVERY;

use std::fmt;

/// One problem in a config, with the path of the field it is about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The few rules that depend on where a config is going. The default is a proxy's: what
/// `spur proxy --config`, `spur validate` and a proxy's own check of every config apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// `k8s:` clusters are accepted: the config goes to a control plane with Kubernetes
    /// discovery (`spur control --kubernetes`), which renders them to endpoints. Elsewhere
    /// they are an error that says so.
    pub k8s_discovery: bool,
    /// The config was rendered by the control plane (pushed on its watch stream): a cluster
    /// may have an empty `endpoints` list, which is how a discovered service with no ready
    /// endpoint arrives. Users cannot write such a cluster.
    pub rendered: bool,
}

/// Validates a parsed config under the default (a proxy's) [`Rules`]: all errors, each with
/// its field path, or `Ok`.
pub fn validate(cfg: &Config) -> Result<(), ConfigError> {
    validate_with(cfg, Rules::default())
}

/// [`validate`] under these rules.
pub fn validate_with(cfg: &Config, rules: Rules) -> Result<(), ConfigError> {
    let mut errors = validate::Errors(Vec::new());
    validate::check(cfg, rules, &mut errors);
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { errors: errors.0 })
    }
}

/// Parses and validates a config text; `file_name` (if any) picks the format by extension.
pub fn load(text: &str, file_name: Option<&str>) -> Result<Config, ConfigError> {
    load_with(text, file_name, Rules::default())
}

/// [`load`] under these rules.
pub fn load_with(text: &str, file_name: Option<&str>, rules: Rules) -> Result<Config, ConfigError> {
    let format = Format::detect(file_name, text);
    let cfg = parse(text, format).map_err(|e| ConfigError { errors: vec![e] })?;
    validate_with(&cfg, rules)?;
    Ok(cfg)
}

/// Reads, parses and validates a config file.
pub fn load_file(path: &std::path::Path) -> Result<Config, ConfigError> {
    load_file_with(path, Rules::default())
}

/// [`load_file`] under these rules.
pub fn load_file_with(path: &std::path::Path, rules: Rules) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        errors: vec![FieldError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }],
    })?;
    load_with(&text, path.file_name().and_then(|n| n.to_str()), rules)
}

/// Reads a token file (bearer tokens, join tokens): its content with surrounding
/// whitespace trimmed. A missing or empty file is an error that names the file.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(token)
}

/// A one-line description of a valid config, for `spur validate`.
pub fn summary(cfg: &Config) -> String {
    let routes: usize = cfg.listeners.iter().map(|l| l.routes.len()).sum();
    let endpoints: usize = cfg.clusters.iter().map(|c| c.endpoints.len()).sum();
    format!(
        "ok: {} listener(s), {} route(s), {} cluster(s) with {} static endpoint(s), {} flag(s)",
        cfg.listeners.len(),
        routes,
        cfg.clusters.len(),
        endpoints,
        cfg.flags.len()
    )
}

#[cfg(test)]
mod tests;
