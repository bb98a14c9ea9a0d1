//! Aligned tables for people.

use comfy_table::{ContentArrangement, Table, presets};

/// A table with a header and rows, borders drawn with UTF-8 lines, never wrapped (a terminal
/// scrolls; a script reads `--json`).
pub(crate) fn table<I, R>(header: &[&str], rows: I) -> String
where
    I: IntoIterator<Item = R>,
    R: IntoIterator<Item = String>,
{
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    let mut empty = true;
    for row in rows {
        t.add_row(row);
        empty = false;
    }
    if empty {
        return "(none)\n".to_owned();
    }
    format!("{t}\n")
}

/// Name and value pairs, one a line, without a header.
pub(crate) fn fields<I, R>(rows: I) -> String
where
    I: IntoIterator<Item = R>,
    R: IntoIterator<Item = String>,
{
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled);
    for row in rows {
        t.add_row(row);
    }
    format!("{t}\n")
}

/// `text` cut to `max` characters, with `…` when cut: table cells stay readable; `--json` has
/// everything.
pub(crate) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// `-` for nothing.
pub(crate) fn or_dash(text: Option<String>) -> String {
    text.unwrap_or_else(|| "-".to_owned())
}
