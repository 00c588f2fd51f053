//! Diagnostics for operator-written TOML (corral.toml, policy.toml): every problem in a file reported at once,
//! each as `file:line:column: message`, misspelt keys with the nearest valid key suggested.
//!
//! serde stops at the first error, so [`parse_toml`] records it, blanks the offending key/value in a copy of
//! the text (spaces keep every byte offset, so later positions stay true) and deserialises again, until the
//! file parses or no further progress is possible. The valid keys come from serde's own field lists, so there
//! is no second schema to keep in step with the structs.

use serde::de::DeserializeOwned;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem at one place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a file; `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl Diagnostics {
    /// A problem with the file as a whole (unreadable, say): reported at 1:1.
    pub fn single(file: &Path, message: String) -> Diagnostics {
        Diagnostics(vec![Diagnostic {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            message,
        }])
    }

    /// Turns (key path, message) pairs from semantic validation into positioned diagnostics. A path's
    /// numeric parts index arrays of tables (`["dhcp", "reservation", "0", "mac"]`).
    pub fn from_paths(text: &str, file: &Path, errs: Vec<(Vec<String>, String)>) -> Diagnostics {
        let doc = toml_edit::ImDocument::parse(text.to_string()).ok();
        let mut out: Vec<Diagnostic> = errs
            .into_iter()
            .map(|(path, message)| {
                let offset = doc
                    .as_ref()
                    .and_then(|d| span_of_path(d.as_item(), &path))
                    .map(|r| r.start)
                    .unwrap_or(0);
                let (line, column) = line_col(text, offset);
                Diagnostic {
                    file: file.to_path_buf(),
                    line,
                    column,
                    message,
                }
            })
            .collect();
        out.sort_by_key(|d| (d.line, d.column));
        Diagnostics(out)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, text[line_start..offset].chars().count() + 1)
}

/// Finds the span of the value at a key path; falls back to the deepest part of the path that exists.
/// Numeric parts index arrays (of tables, or inline arrays).
pub fn span_of_path(item: &toml_edit::Item, path: &[String]) -> Option<Range<usize>> {
    let Some((first, rest)) = path.split_first() else {
        return item.span();
    };
    match item {
        toml_edit::Item::ArrayOfTables(a) => {
            let t = a.get(first.parse().ok()?)?;
            span_in_table(t, rest).or_else(|| t.span())
        }
        toml_edit::Item::Value(v) => span_in_value(v, path),
        _ => {
            let (key, value) = item.as_table_like()?.get_key_value(first)?;
            span_of_path(value, rest)
                .or_else(|| value.span())
                .or_else(|| key.span())
        }
    }
}

fn span_in_value(v: &toml_edit::Value, path: &[String]) -> Option<Range<usize>> {
    let Some((first, rest)) = path.split_first() else {
        return v.span();
    };
    let inner = match v {
        toml_edit::Value::Array(a) => a.get(first.parse().ok()?)?,
        toml_edit::Value::InlineTable(t) => t.get(first)?,
        _ => return None,
    };
    span_in_value(inner, rest).or_else(|| inner.span())
}

fn span_in_table(t: &toml_edit::Table, path: &[String]) -> Option<Range<usize>> {
    let Some((first, rest)) = path.split_first() else {
        return t.span();
    };
    let (key, value) = t.get_key_value(first)?;
    span_of_path(value, rest)
        .or_else(|| value.span())
        .or_else(|| key.span())
}

/// Deserialises TOML, collecting every error with its position.
pub fn parse_toml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, Diagnostics> {
    match parse_toml_lenient(text, file) {
        (Some(v), errs) if errs.is_empty() => Ok(v),
        (_, errs) => Err(Diagnostics(errs)),
    }
}

/// Like [`parse_toml`], but also returns the value parsed once the offending entries were blanked, so the
/// caller can run its semantic checks too and report those problems in the same pass.
pub fn parse_toml_lenient<T: DeserializeOwned>(
    text: &str,
    file: &Path,
) -> (Option<T>, Vec<Diagnostic>) {
    let mut buf = text.to_string();
    let mut found: Vec<Diagnostic> = Vec::new();
    let at = |offset: usize, message: String| {
        let (line, column) = line_col(text, offset);
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            message,
        }
    };
    // Each round removes one offending key; a file has far fewer bad keys than this.
    for _ in 0..256 {
        let err = match toml::from_str::<T>(&buf) {
            Ok(v) => return (Some(v), found),
            Err(e) => e,
        };
        let span = err.span();
        let message = describe(err.message());
        // A missing field after we blanked a bad value is a consequence, not a new problem.
        if !found.is_empty() && err.message().starts_with("missing field") {
            break;
        }
        let Some(span) = span else {
            found.push(at(0, message));
            break;
        };
        found.push(at(span.start, message));
        match blank_entry(&buf, span.clone()) {
            Some(next) if next != buf => buf = next,
            _ => break,
        }
    }
    found.dedup();
    (None, found)
}

/// Rewrites serde/toml messages into operator language, adding a suggestion for unknown keys.
fn describe(msg: &str) -> String {
    let msg = msg.trim();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let mut out = format!("unknown key `{name}`");
        if let Some(best) = nearest(name, &expected) {
            out.push_str(&format!(", did you mean `{best}`?"));
        } else if !expected.is_empty() {
            out.push_str(&format!(" (valid keys here: {})", expected.join(", ")));
        }
        return out;
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let mut out = format!("unknown value `{name}`");
        match nearest(name, &expected) {
            Some(best) => out.push_str(&format!(", did you mean `{best}`?")),
            None => out.push_str(&format!(" (expected one of: {})", expected.join(", "))),
        }
        return out;
    }
    msg.to_string()
}

/// The candidate closest to `name`, if it is close enough to be a plausible typo.
pub fn nearest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Blanks the `key = value` entry (or `[table]` with its body) that contains `span`, keeping offsets.
fn blank_entry(buf: &str, span: Range<usize>) -> Option<String> {
    let doc = toml_edit::ImDocument::parse(buf.to_string()).ok()?;
    let range = find_entry(doc.as_table(), &span)?;
    let mut bytes = buf.as_bytes().to_vec();
    for b in &mut bytes[range] {
        if *b != b'\n' {
            *b = b' ';
        }
    }
    String::from_utf8(bytes).ok()
}

/// The byte range of the innermost entry whose key or value covers `span`.
fn find_entry(table: &toml_edit::Table, span: &Range<usize>) -> Option<Range<usize>> {
    find_in(table, span)
}

fn covers(r: &Range<usize>, span: &Range<usize>) -> bool {
    r.start <= span.start && span.start < r.end.max(r.start + 1)
}

fn find_in(table: &dyn toml_edit::TableLike, span: &Range<usize>) -> Option<Range<usize>> {
    for (key, item) in table.iter() {
        let key_span = table.key(key).and_then(|k| k.span());
        let val_span = item.span();
        // Descend first: the innermost entry is the one to remove.
        let inner = match item {
            toml_edit::Item::Table(t) => find_in(t, span),
            toml_edit::Item::ArrayOfTables(a) => a.iter().find_map(|t| find_in(t, span)),
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => find_in(t, span),
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
        let hit = key_span.as_ref().is_some_and(|k| covers(k, span))
            || val_span.as_ref().is_some_and(|v| covers(v, span));
        if hit {
            let start = key_span
                .as_ref()
                .map(|k| k.start)
                .or(val_span.as_ref().map(|v| v.start))?;
            let end = match item {
                // A whole unknown table: blank its body too (everything up to the next header).
                toml_edit::Item::Table(t) => t
                    .iter()
                    .filter_map(|(_, i)| i.span())
                    .map(|s| s.end)
                    .max()
                    .unwrap_or(start),
                _ => val_span.map(|v| v.end).unwrap_or(start),
            };
            return Some(start..end.max(key_span.map(|k| k.end).unwrap_or(start)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\n", 0), (1, 1));
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
    }

    #[test]
    fn nearest_suggests_close_names_only() {
        assert_eq!(
            nearest("adress", &["address", "interface"]),
            Some("address")
        );
        assert_eq!(nearest("zzzzzz", &["address", "interface"]), None);
    }
}
