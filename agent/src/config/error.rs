//! Config errors, located in the file: file, line, key, and what would be valid.

use std::{fmt, ops::Range, path::PathBuf};

/// A configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key the problem is about, e.g. `backend[1].ports[0]`.
    pub key: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Turns spans of one file's text into located errors.
pub(super) struct Locator<'a> {
    pub path: &'a std::path::Path,
    pub text: &'a str,
}

impl Locator<'_> {
    /// 1-based line of a byte offset.
    pub fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    /// An error at `span` (if known) about `key`.
    pub fn error(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line: span.map(|span| self.line(span.start)),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// A deserialization error: toml's span and message, serde_path_to_error's key.
    pub fn deserialize_error(
        &self,
        err: serde_path_to_error::Error<toml::de::Error>,
    ) -> ConfigError {
        let mut key = key_of(err.path());
        let inner = err.into_inner();
        if inner.message().starts_with("unknown field") {
            // The path ends in the unknown key itself: name the table it was found in.
            key.truncate(key.rfind('.').unwrap_or(0));
        }
        ConfigError {
            path: self.path.to_owned(),
            line: inner.span().map(|span| self.line(span.start)),
            key: (!key.is_empty()).then_some(key),
            message: did_you_mean(&inner.message().trim_end().replace('\n', "; ")),
        }
    }
}

/// `backend[0].health.http` from serde's path, without toml's private `Spanned` fields.
fn key_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } if name.starts_with("$__serde_spanned") => {}
            Segment::Map { key: name } => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    key
}

/// Adds "did you mean `x`?" to serde's "unknown field `y`, expected one of `a`, `b`" (and
/// "unknown variant") messages when one expected name is close to the one given.
pub(super) fn did_you_mean(message: &str) -> String {
    let quoted: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    let Some((given, expected)) = quoted.split_first() else {
        return message.to_string();
    };
    if !message.starts_with("unknown field") && !message.starts_with("unknown variant") {
        return message.to_string();
    }
    let best = expected
        .iter()
        .map(|candidate| (edit_distance(given, candidate), *candidate))
        .min();
    match best {
        Some((distance, candidate)) if distance <= given.len().max(3) / 3 + 1 => {
            format!("{message}; did you mean `{candidate}`?")
        }
        _ => message.to_string(),
    }
}

/// Levenshtein distance (names are short; quadratic is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}
