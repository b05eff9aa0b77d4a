//! Reading a config: the file, `${VAR}` expansion ([`expand_env`],
//! [`EnvError`]) and the YAML, into a [`Config`] that is not yet checked.

use super::{Config, ConfigErrors};
use std::path::Path;

impl Config {
    /// Reads, expands and parses `path`, without checking it (see
    /// [`Config::validate`]).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{file}: cannot read: {e}")]))?;
        Config::parse(&file, &text)
    }

    /// Parses YAML `text` (named `file` in errors) into a config, without
    /// validating it.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
        let expanded = expand_env(text, |k| std::env::var(k).ok())
            .map_err(|e| ConfigErrors(vec![format!("{file}: {e}")]))?;
        if expanded.trim().is_empty() {
            return Ok(Config::default());
        }
        let de = serde_yaml::Deserializer::from_str(&expanded);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            ConfigErrors(vec![if path == "." {
                format!("{file}: {inner}")
            } else {
                format!("{file}: {path}: {inner}")
            }])
        })?;
        // The health check in its one spelling, `health_check` (what `check`
        // prints); both spellings are left for `validate` to refuse.
        for up in config.upstreams.values_mut() {
            if up.health_check.is_none() {
                up.health_check = Some(up.health_check());
                up.health_check_interval = None;
            }
        }
        Ok(config)
    }
}

/// Why `${VAR}` expansion failed; shown after the file's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// A `${` without its `}`: the rest of its line.
    #[error("unclosed '${{' in '{0}'")]
    Unclosed(String),
    /// What is between `${` and `}` is not a name (and default).
    #[error("'${{{0}}}' is not a valid variable reference")]
    NotAReference(String),
    /// The variable is not set and has no default.
    #[error("environment variable {0} is not set (write ${{{0}:-}} to allow it empty)")]
    Unset(String),
}

/// Expands `${VAR}` and `${VAR:-default}` with `lookup`. An unset variable
/// without a default is an error naming it.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| EnvError::Unclosed(after.lines().next().unwrap_or("").into()))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(EnvError::NotAReference(expr.into()));
        }
        match (lookup(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(EnvError::Unset(name.into())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        let env = |k: &str| (k == "A").then(|| "1".to_string());
        assert_eq!(expand_env("x${A}y${B:-z}", env).unwrap(), "x1yz");
        assert_eq!(expand_env("${B:-}", env).unwrap(), "");
        assert!(expand_env("${B}", env)
            .unwrap_err()
            .to_string()
            .contains("B is not set"));
        assert!(expand_env("${A", env).is_err());
        // The texts users see, after the file's name.
        let shown = |text: &str| expand_env(text, env).unwrap_err().to_string();
        assert_eq!(
            shown("x ${B}"),
            "environment variable B is not set (write ${B:-} to allow it empty)"
        );
        assert_eq!(shown("a: \"${A\nb"), "unclosed '${' in 'A'");
        assert_eq!(
            shown("${A-B}"),
            "'${A-B}' is not a valid variable reference"
        );
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let e = Config::parse("f.yaml", "limits:\n  max_hled: 3\n").unwrap_err();
        assert!(e.0[0].starts_with("f.yaml: limits"), "{e}");
        assert!(e.0[0].contains("max_hled"), "{e}");
        let e = Config::parse("f.yaml", "grace_period: soon\n").unwrap_err();
        assert!(
            e.0[0].contains("grace_period") && e.0[0].contains("invalid duration"),
            "{e}"
        );
    }
}
