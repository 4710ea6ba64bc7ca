//! Config errors, located in the file: file, line, key, and what would be valid.

use std::{fmt, ops::Range, path::PathBuf};

/// Every problem found in a config, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> ConfigErrors {
        ConfigErrors(vec![error])
    }
}

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

    /// A TOML syntax error (the only error that stops reading the file).
    pub fn syntax_error(&self, err: toml::de::Error) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line: err.span().map(|span| self.line(span.start)),
            key: None,
            message: err.message().trim_end().replace('\n', "; "),
        }
    }

    /// A key the schema does not know, at `path` (its last segment), with the keys its table
    /// accepts (`expected`).
    pub fn unknown_key(&self, path: &[Segment], expected: &[&str]) -> ConfigError {
        let (name, table) = match path.split_last() {
            Some((Segment::Key(name), table)) => (name.as_str(), table),
            _ => ("?", path),
        };
        let expected = match expected {
            [] => "there are no fields".to_string(),
            [one] => format!("expected `{one}`"),
            [one, two] => format!("expected `{one}` or `{two}`"),
            many => format!(
                "expected one of {}",
                many.iter()
                    .map(|field| format!("`{field}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let key = key_of(table);
        ConfigError {
            path: self.path.to_owned(),
            line: self.key_span(path).map(|span| self.line(span.start)),
            key: (!key.is_empty()).then_some(key),
            message: did_you_mean(&format!("unknown field `{name}`, {expected}")),
        }
    }

    /// Where a key is written, found with toml's own parser.
    fn key_span(&self, path: &[Segment]) -> Option<Range<usize>> {
        use toml_edit::{ArrayOfTables, Item, Table, Value};
        enum Node<'a> {
            Table(&'a Table),
            Tables(&'a ArrayOfTables),
            Value(&'a Value),
        }
        fn node(item: &Item) -> Option<Node<'_>> {
            match item {
                Item::Table(table) => Some(Node::Table(table)),
                Item::ArrayOfTables(tables) => Some(Node::Tables(tables)),
                Item::Value(value) => Some(Node::Value(value)),
                Item::None => None,
            }
        }
        let document = toml_edit::ImDocument::parse(self.text).ok()?;
        let (Segment::Key(last), parents) = path.split_last()? else {
            return None;
        };
        let mut at = Node::Table(document.as_table());
        for segment in parents {
            at = match (at, segment) {
                (Node::Table(table), Segment::Key(key)) => node(table.get(key)?)?,
                (Node::Value(Value::InlineTable(table)), Segment::Key(key)) => {
                    Node::Value(table.get(key)?)
                }
                (Node::Tables(tables), Segment::Index(index)) => Node::Table(tables.get(*index)?),
                (Node::Value(Value::Array(array)), Segment::Index(index)) => {
                    Node::Value(array.get(*index)?)
                }
                _ => return None,
            };
        }
        let (key, _) = match at {
            Node::Table(table) => table.get_key_value(last)?,
            Node::Value(Value::InlineTable(table)) => {
                let (key, _) = table.get_key_value(last)?;
                return key.span();
            }
            _ => return None,
        };
        key.span()
    }
}

/// A step of a key's path: `backend` `[0]` `haproxy` `servr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// The segments of a path serde_ignored reports, without toml's private `Spanned` fields and
/// serde's `Option`/newtype steps.
pub fn segments(path: &serde_ignored::Path<'_>) -> Vec<Segment> {
    use serde_ignored::Path;
    let mut segments = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => segments.push(Segment::Index(*index)),
        Path::Map { key, .. } if !key.starts_with("$__serde_spanned") => {
            segments.push(Segment::Key(key.clone()))
        }
        _ => {}
    }
    segments
}

/// `backend[0].health` from segments.
fn key_of(path: &[Segment]) -> String {
    let mut key = String::new();
    for segment in path {
        match segment {
            Segment::Index(index) => key.push_str(&format!("[{index}]")),
            Segment::Key(name) => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
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
