//! Printing: aligned tables, their JSON form, timestamps and error messages.

use std::io::{self, Write};

use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, presets};
use serde_json::{Map, Value};

/// Rows under named columns, printed as an aligned table or as a JSON array of objects whose
/// keys are the columns.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    keys: Vec<String>,
    rows: Vec<Vec<Value>>,
}

impl Table {
    /// A table with these column headers; each column's JSON key is its header in snake_case
    /// (`CONFIG ID` → `config_id`).
    pub fn new(headers: &[&'static str]) -> Table {
        let keys = headers.iter().map(|header| snake_case(header)).collect();
        Table {
            headers: headers.to_vec(),
            keys,
            rows: Vec::new(),
        }
    }

    /// A table whose JSON keys are given explicitly, one per header.
    pub fn with_keys(columns: &[(&'static str, &'static str)]) -> Table {
        Table {
            headers: columns.iter().map(|(header, _)| *header).collect(),
            keys: columns.iter().map(|(_, key)| (*key).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row, one value per column: strings print as they are, `null` as an empty cell,
    /// anything else as compact JSON.
    pub fn push(&mut self, row: Vec<Value>) {
        debug_assert_eq!(row.len(), self.headers.len(), "one value per column");
        self.rows.push(row);
    }

    /// Prints the table, or its JSON form when `json` is set.
    pub fn print(&self, out: &mut impl Write, json: bool) -> io::Result<()> {
        if json {
            return print_json(out, &self.to_json());
        }
        let mut table = comfy_table::Table::new();
        table
            .load_preset(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(self.headers.clone());
        for row in &self.rows {
            table.add_row(row.iter().map(cell_text).collect::<Vec<_>>());
        }
        for column in table.column_iter_mut() {
            column.set_padding((0, 2));
        }
        writeln!(out, "{}", table.trim_fmt())
    }

    /// The table as a JSON array of objects, one per row, keyed by the columns' keys.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|row| {
                    let object: Map<String, Value> =
                        self.keys.iter().cloned().zip(row.iter().cloned()).collect();
                    Value::Object(object)
                })
                .collect(),
        )
    }
}

/// Prints `value` as pretty JSON followed by a newline.
pub fn print_json(out: &mut impl Write, value: &Value) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// A timestamp as Butler prints it: `YYYY-MM-DD HH:MM:SS`, UTC.
pub fn timestamp(at: DateTime<Utc>) -> Value {
    Value::String(at.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// A timestamp to the millisecond, for events that follow each other closely:
/// `YYYY-MM-DD HH:MM:SS.mmm`, UTC.
pub fn precise_timestamp(at: DateTime<Utc>) -> Value {
    Value::String(at.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
}

/// An optional timestamp: [`timestamp`] or `null` (an empty cell).
pub fn opt_timestamp(at: Option<DateTime<Utc>>) -> Value {
    at.map_or(Value::Null, timestamp)
}

/// A duration as people read it: `0.4s`, `12.0s`, `3m05s`, `2h07m`.
pub fn duration(length: std::time::Duration) -> String {
    let seconds = length.as_secs();
    if seconds < 60 {
        format!("{:.1}s", length.as_secs_f64())
    } else if seconds < 3600 {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    } else {
        format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60)
    }
}

/// The message printed for a failed command: the error and every cause not already part of its
/// text, joined by `: `.
pub fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.ends_with(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// Whether the failure is only that the reader of stdout went away (`butler list-runs | head`).
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn cell_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn snake_case(header: &str) -> String {
    header
        .split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join("_")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn render(table: &Table, json: bool) -> String {
        let mut out = Vec::new();
        table.print(&mut out, json).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn table_aligns_columns_and_leaves_absent_values_empty() {
        let mut table = Table::new(&["ID", "CONFIG ID", "ENDED"]);
        table.push(vec![json!(7), json!("abc"), Value::Null]);
        table.push(vec![json!(12), json!("x"), json!("2024-01-01 00:00:00")]);
        let text = render(&table, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ID  CONFIG ID  ENDED");
        assert_eq!(lines[1], "7   abc");
        assert_eq!(lines[2], "12  x          2024-01-01 00:00:00");
    }

    #[test]
    fn json_uses_snake_case_column_keys_and_keeps_types() {
        let mut table = Table::new(&["ID", "CONFIG ID"]);
        table.push(vec![json!(7), json!("abc")]);
        let value: Value = serde_json::from_str(&render(&table, true)).unwrap();
        assert_eq!(value, json!([{"id": 7, "config_id": "abc"}]));
    }

    #[test]
    fn durations_read_naturally_at_every_scale() {
        use std::time::Duration;
        assert_eq!(duration(Duration::from_millis(420)), "0.4s");
        assert_eq!(duration(Duration::from_secs(59)), "59.0s");
        assert_eq!(duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(
            duration(Duration::from_secs(2 * 3600 + 7 * 60 + 9)),
            "2h07m"
        );
    }

    #[test]
    fn error_message_keeps_causes_not_already_in_the_text() {
        let error = anyhow::Error::new(io::Error::other("disk full")).context("cannot write x");
        assert_eq!(error_message(&error), "cannot write x: disk full");
        let inner = io::Error::other("locked");
        let error = anyhow::Error::new(inner).context("open failed: locked");
        assert_eq!(error_message(&error), "open failed: locked");
    }
}
