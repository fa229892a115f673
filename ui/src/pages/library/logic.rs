//! Pure helpers of the library page: the tabs, one table row per item, the search
//! filter and the text of figures (dates, NLL changes, download progress).

use crate::format;
use attune_protocol::{
    AdapterSummary, DatasetSummary, EvalReport, ModelSummary, PullUpdate, RunSummary,
    TemplateRecord,
};

/// The library's tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Models,
    Datasets,
    Runs,
    Adapters,
    Templates,
    Evaluations,
}

impl Tab {
    /// Every tab, in display order.
    pub const ALL: [Tab; 6] = [
        Tab::Models,
        Tab::Datasets,
        Tab::Runs,
        Tab::Adapters,
        Tab::Templates,
        Tab::Evaluations,
    ];

    /// Stable key: the tab button is `tab-<key>`, the setting stores it.
    pub fn key(self) -> &'static str {
        match self {
            Tab::Models => "models",
            Tab::Datasets => "datasets",
            Tab::Runs => "runs",
            Tab::Adapters => "adapters",
            Tab::Templates => "templates",
            Tab::Evaluations => "evaluations",
        }
    }

    /// The tab's title.
    pub fn label(self) -> &'static str {
        match self {
            Tab::Models => "Models",
            Tab::Datasets => "Datasets",
            Tab::Runs => "Runs",
            Tab::Adapters => "Adapters",
            Tab::Templates => "Templates",
            Tab::Evaluations => "Evaluations",
        }
    }

    /// The tab with this key.
    pub fn parse(key: &str) -> Option<Tab> {
        Tab::ALL.into_iter().find(|t| t.key() == key)
    }

    /// Column titles of the tab's table (the first is the name).
    pub fn headers(self) -> &'static [&'static str] {
        match self {
            Tab::Models => &[
                "Name",
                "Architecture",
                "Parameters",
                "Quantization",
                "Size",
                "Added",
            ],
            Tab::Datasets => &["Name", "Format", "Train", "Valid", "Test", "Imported"],
            Tab::Runs => &["Name", "Status", "Method", "Model", "Dataset", "Steps"],
            Tab::Adapters => &["Name", "Kind", "Base model", "Eval NLL", "Created"],
            Tab::Templates => &["Name", "Version", "Saved"],
            Tab::Evaluations => &["Subject", "Kind", "Dataset", "Split", "NLL", "Recorded"],
        }
    }
}

/// One line of a library table: the item's id and name, then the other cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: i64,
    pub name: String,
    pub cells: Vec<String>,
}

impl Row {
    /// Whether every word of `query` appears (case-insensitively) in the name or a cell.
    pub fn matches(&self, query: &str) -> bool {
        let haystack = std::iter::once(self.name.as_str())
            .chain(self.cells.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        query
            .split_whitespace()
            .all(|word| haystack.contains(&word.to_lowercase()))
    }
}

/// "2026-11-28 03:32" from an RFC 3339 timestamp (the text as is when it is not one).
pub fn short_date(ts: &str) -> String {
    if ts.len() >= 16 && ts.as_bytes().get(10) == Some(&b'T') {
        format!("{} {}", &ts[..10], &ts[11..16])
    } else {
        ts.to_string()
    }
}

/// The last part of a path (either separator).
pub fn file_name(path: &str) -> &str {
    let trimmed = path.trim_end_matches(['/', '\\']);
    trimmed
        .rsplit(['/', '\\'])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(path)
}

/// At most `max` characters of `text`, with "…" when cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// An NLL with 3 decimals, or "—".
pub fn nll(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "—".into())
}

/// Relative change from `before` to `after` (negative: it dropped).
pub fn relative_change(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if b.is_finite() && a.is_finite() && b != 0.0 => Some((a - b) / b),
        _ => None,
    }
}

/// "2.310 → 1.870 (−19.0%)", or what is known.
pub fn before_after(before: Option<f64>, after: Option<f64>) -> String {
    let base = format!("{} → {}", nll(before), nll(after));
    match relative_change(before, after) {
        Some(c) => {
            let sign = if c < 0.0 { "−" } else { "+" };
            format!("{base} ({sign}{:.1}%)", c.abs() * 100.0)
        }
        None => base,
    }
}

/// Fraction of a pull done, None when the size is unknown.
pub fn pull_fraction(u: &PullUpdate) -> Option<f64> {
    if u.cached {
        return Some(1.0);
    }
    (u.total_bytes > 0).then(|| u.bytes_done as f64 / u.total_bytes as f64)
}

/// "File 2 of 3 · model.gguf · 12.0 MiB of 90.0 MiB".
pub fn pull_label(u: &PullUpdate) -> String {
    let amount = if u.cached {
        "already downloaded".to_string()
    } else if u.total_bytes > 0 {
        format!(
            "{} of {}",
            format::bytes(u.bytes_done),
            format::bytes(u.total_bytes)
        )
    } else {
        format::bytes(u.bytes_done)
    };
    // `file_index` counts from 1 (the engine's `PullProgress`).
    format!(
        "File {} of {} · {} · {}",
        u.file_index.max(1),
        u.file_count.max(u.file_index),
        u.file,
        amount
    )
}

/// The models tab's row.
pub fn model_row(m: &ModelSummary) -> Row {
    Row {
        id: m.id,
        name: m.name.clone(),
        cells: vec![
            m.architecture.clone(),
            format::parameters(m.parameters),
            m.quantization.clone(),
            format::bytes(m.file_size),
            short_date(&m.added_at),
        ],
    }
}

/// The datasets tab's row.
pub fn dataset_row(d: &DatasetSummary) -> Row {
    Row {
        id: d.id,
        name: d.name.clone(),
        cells: vec![
            d.format.as_str().to_string(),
            d.train_rows.to_string(),
            d.valid_rows.to_string(),
            d.test_rows.to_string(),
            short_date(&d.created_at),
        ],
    }
}

/// The runs tab's row.
pub fn run_row(r: &RunSummary) -> Row {
    Row {
        id: r.id,
        name: r.name.clone(),
        cells: vec![
            r.status.as_str().to_string(),
            r.method.clone(),
            r.model.clone(),
            r.dataset.clone(),
            format!("{} / {}", r.step, r.total_steps),
        ],
    }
}

/// The adapters tab's row.
pub fn adapter_row(a: &AdapterSummary) -> Row {
    Row {
        id: a.id,
        name: a.name.clone(),
        cells: vec![
            a.kind.as_str().to_string(),
            a.base_model.clone(),
            nll(a.metrics.eval_nll_after),
            short_date(&a.created_at),
        ],
    }
}

/// The templates tab's row.
pub fn template_row(t: &TemplateRecord) -> Row {
    Row {
        id: t.id,
        name: t.name.clone(),
        cells: vec![
            format!("v{} of {}", t.version, t.versions),
            short_date(&t.created_at),
        ],
    }
}

/// The evaluations tab's row; `dataset` is the dataset's name when known.
pub fn eval_row(e: &EvalReport, dataset: Option<&str>) -> Row {
    Row {
        id: e.id,
        name: e.subject.clone(),
        cells: vec![
            e.subject_kind.clone(),
            dataset
                .map(str::to_string)
                .unwrap_or_else(|| format!("dataset #{}", e.dataset_id)),
            e.split.as_str().to_string(),
            format!("{:.3}", e.mean_nll),
            short_date(&e.created_at),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tabs_round_trip_and_have_headers() {
        for t in Tab::ALL {
            assert_eq!(Tab::parse(t.key()), Some(t));
            assert!(!t.headers().is_empty());
        }
        assert_eq!(Tab::parse("nope"), None);
    }

    #[test]
    fn search_needs_every_word_anywhere() {
        let row = Row {
            id: 1,
            name: "SmolLM2-135M".into(),
            cells: vec!["llama".into(), "Q4_1".into()],
        };
        assert!(row.matches(""));
        assert!(row.matches("smol q4"));
        assert!(row.matches("LLAMA"));
        assert!(!row.matches("smol qwen"));
    }

    #[test]
    fn dates_paths_and_excerpts() {
        assert_eq!(short_date("2026-11-28T03:32:16Z"), "2026-11-28 03:32");
        assert_eq!(short_date("yesterday"), "yesterday");
        assert_eq!(file_name("/home/a/report.pdf"), "report.pdf");
        assert_eq!(file_name("C:\\data\\x.csv"), "x.csv");
        assert_eq!(file_name("/models/qwen/"), "qwen");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt("abc", 3), "abc");
    }

    #[test]
    fn nll_changes_read_as_percentages() {
        assert_eq!(before_after(Some(2.0), Some(1.5)), "2.000 → 1.500 (−25.0%)");
        assert_eq!(before_after(Some(2.0), Some(2.2)), "2.000 → 2.200 (+10.0%)");
        assert_eq!(before_after(None, Some(1.0)), "— → 1.000");
        assert_eq!(relative_change(Some(0.0), Some(1.0)), None);
    }

    #[test]
    fn pull_progress_counts_files_from_one() {
        let u = PullUpdate {
            file: "model.gguf".into(),
            file_index: 2,
            file_count: 3,
            bytes_done: 512,
            total_bytes: 1024,
            cached: false,
        };
        assert_eq!(pull_fraction(&u), Some(0.5));
        assert_eq!(
            pull_label(&u),
            "File 2 of 3 · model.gguf · 512 B of 1.0 KiB"
        );
        // One file: "1 of 1", as the engine counts (it once read "2 of 2").
        let single = PullUpdate {
            file_index: 1,
            file_count: 1,
            ..u.clone()
        };
        assert!(
            pull_label(&single).starts_with("File 1 of 1 ·"),
            "{}",
            pull_label(&single)
        );
        let unknown = PullUpdate {
            total_bytes: 0,
            ..u
        };
        assert_eq!(pull_fraction(&unknown), None);
    }
}
