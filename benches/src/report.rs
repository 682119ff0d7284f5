//! Printing figures.

use serde_json::json;

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// The scenario it belongs to.
    pub scenario: &'static str,
    /// What was measured.
    pub metric: String,
    /// The measurement.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The physical limit measured beside it, in the same unit, when there is one.
    pub limit: Option<f64>,
    /// What the limit is.
    pub limit_is: Option<String>,
}

impl Figure {
    pub fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Figure {
            scenario,
            metric: metric.into(),
            value,
            unit,
            limit: None,
            limit_is: None,
        }
    }

    pub fn limit(mut self, limit: f64, what: impl Into<String>) -> Self {
        self.limit = Some(limit);
        self.limit_is = Some(what.into());
        self
    }
}

pub fn print(figures: &[Figure], json: bool) {
    if json {
        for f in figures {
            let mut line = json!({
                "scenario": f.scenario,
                "metric": f.metric,
                "value": round(f.value),
                "unit": f.unit,
            });
            if let (Some(limit), Some(what)) = (f.limit, &f.limit_is) {
                line["limit"] = json!(round(limit));
                line["limit_is"] = json!(what);
            }
            println!("{line}");
        }
        return;
    }
    let rows: Vec<[String; 5]> = figures
        .iter()
        .map(|f| {
            [
                f.scenario.to_owned(),
                f.metric.clone(),
                format!("{} {}", round(f.value), f.unit),
                f.limit
                    .map(|l| format!("{} {}", round(l), f.unit))
                    .unwrap_or_default(),
                f.limit_is.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["SCENARIO", "METRIC", "VALUE", "LIMIT", "LIMIT IS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

fn round(value: f64) -> f64 {
    if value.abs() >= 100.0 {
        value.round()
    } else {
        (value * 100.0).round() / 100.0
    }
}
