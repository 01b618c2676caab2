//! How reports are printed: a table for people, JSON or YAML for scripts (the
//! report's own serialisation, which is its documented schema).

use serde::Serialize;

/// An output format (`-o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// What a command prints.
pub trait Report: Serialize {
    /// The report for people.
    fn table(&self) -> String;

    /// Whether what the report checks is right; weftctl exits 1 when not.
    fn passed(&self) -> bool {
        true
    }
}

impl Format {
    pub fn render(self, report: &impl Report) -> anyhow::Result<String> {
        Ok(match self {
            Self::Table => report.table(),
            Self::Json => serde_json::to_string_pretty(report)? + "\n",
            Self::Yaml => serde_yaml::to_string(report)?,
        })
    }
}

/// `rows` under `header`, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut text = line(&mut header.iter().copied());
    for row in rows {
        text += &line(&mut row.iter().map(String::as_str));
    }
    text
}

/// A duration for people: `3d4h`, `2h5m`, `40s`; `-` before an expired one.
pub fn age(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let seconds = seconds.unsigned_abs();
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60);
    let text = match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m{}s", seconds % 60),
        (0, _, _) => format!("{hours}h{minutes}m"),
        _ => format!("{days}d{hours}h"),
    };
    format!("{sign}{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            vec!["node0".to_owned(), "ready".to_owned()],
            vec!["a-long-node".to_owned(), "no".to_owned()],
        ];
        assert_eq!(
            table(&["NODE", "AGENT"], &rows),
            "NODE         AGENT\nnode0        ready\na-long-node  no\n"
        );
    }

    #[test]
    fn ages_read_at_a_glance() {
        for (seconds, expected) in [
            (0, "0s"),
            (59, "59s"),
            (61, "1m1s"),
            (3_660, "1h1m"),
            (90_000, "1d1h"),
            (-120, "-2m0s"),
        ] {
            assert_eq!(age(seconds), expected);
        }
    }
}
