//! spur-config: what the user wrote. Schema types, parsing (YAML and JSON), validation.
//!
//! Pure: no sockets, no runtime. The proxy and the control plane both call [`load`] (or
//! [`validate`] on a config they already hold) and act only on a config that passed.
//!
//! Every value is parsed once, here, into the type the proxy uses (a `SocketAddr`, a
//! `HeaderName`, a compiled regex, a [`SpiffeId`]): validation and the proxy cannot
//! disagree about what a value means, and the proxy's compile has nothing left to fail on.
//!
//! Module map: [`types`] (top level, listeners, flags), [`route`], [`cluster`], [`authz`],
//! [`edge`] (rate limits, header rules, rewrites, redirects, CORS), [`rollout`] and [`defaults`] are the
//! schema; [`values`], [`conditions`] and [`peers`] the parsed
//! value types;
//! `depth` (nesting limit), `tree` (deserializing with paths and plain words) and `parse`
//! (every parse error) read text; `validate` checks what relates fields to each other.

pub mod args;
pub mod authz;
pub mod cluster;
pub mod conditions;
pub mod defaults;
mod depth;
pub mod edge;
pub mod grpc;
mod parse;
pub mod peers;
pub mod report;
pub mod rollout;
pub mod route;
pub mod spiffe;
pub mod tracing;
mod tree;
pub mod types;
mod units;
mod validate;
pub mod values;

pub use authz::{
    listener_policy, Authz, AuthzAction, AuthzDefault, AuthzFrom, AuthzRule, AuthzTo, GrpcMatch,
    GrpcName,
};
pub use cluster::*;
pub use conditions::{CookieName, HashOn, RetryCondition, RetryOn, UpgradeProtocol};
pub use depth::MAX_DEPTH;
pub use edge::{
    Cors, HeaderRules, HeaderTemplate, HeaderValues, HostName, LimitKey, LimitMode, LimitScope,
    OriginPattern, RateLimit, Redirect, RedirectScheme, Rewrite, SlowStart, XForwarded,
};
pub use grpc::GrpcCode;
pub use parse::{parse, Format};
pub use peers::{Cidr, IdentityGlob, Namespace};
pub use rollout::{OnFailure, Percent, Rollout};
pub use route::*;
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use tracing::{OtlpEndpoint, Propagation, Tracing};
pub use types::*;
pub use units::{ByteSize, Duration};
pub use validate::K8S_NEEDS_DISCOVERY;
pub use values::{ConfigValue, HeaderRegex, HostPort, Parsed};

/// Refuses a YAML or JSON text nested deeper than [`MAX_DEPTH`], without parsing it (for
/// any document read from the network, not only configs). The error says so in words.
pub fn check_depth(text: &str, format: Format) -> Result<(), String> {
    match format {
        Format::Json => depth::check_json(text),
        Format::Yaml => depth::check_yaml(text),
    }
}

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
    load_text(text, Format::detect(file_name, text), rules)
}

/// Parses and validates a config text of a known format: every error of the file, each
/// at its path once. Parse errors come first; a validation error about a field that failed
/// to parse, or about what contains it or lies inside it, is a consequence and left out.
pub fn load_text(text: &str, format: Format, rules: Rules) -> Result<Config, ConfigError> {
    let read = parse::read(text, format);
    let mut errors = read.errors;
    let parse_failed: Vec<String> = errors.iter().map(|e| e.path.clone()).collect();
    if let Some(cfg) = read.config {
        let mut found = validate::Errors(Vec::new());
        validate::check(&cfg, rules, &mut found);
        for mut e in found.0 {
            e.path = parse::in_file_terms(&e.path, &read.left_out);
            let consequence = parse_failed.iter().any(|p| parse::related(p, &e.path));
            if !consequence && !errors.contains(&e) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            return Ok(cfg);
        }
    }
    Err(ConfigError { errors })
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
#[cfg(test)]
mod tests_authz;
#[cfg(test)]
mod tests_bounds;
#[cfg(test)]
mod tests_edge;
#[cfg(test)]
mod tests_grpc;
#[cfg(test)]
mod tests_read;
#[cfg(test)]
mod tests_rollout;
