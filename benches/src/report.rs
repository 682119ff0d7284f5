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

/// Prints figures measured in one run.
pub fn print(figures: &[Figure], json: bool) {
    let runs: Vec<Repeated> = figures.iter().map(Repeated::from).collect();
    print_repeated(&runs, json);
}

/// One figure as measured in each of several runs of its scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Repeated {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    /// The figure of each run, in the order of the runs.
    pub values: Vec<f64>,
    /// Its limit in each run that measured one.
    pub limits: Vec<f64>,
    pub limit_is: Option<String>,
}

impl From<&Figure> for Repeated {
    fn from(f: &Figure) -> Self {
        Repeated {
            scenario: f.scenario.to_owned(),
            metric: f.metric.clone(),
            unit: f.unit.to_owned(),
            values: vec![f.value],
            limits: f.limit.into_iter().collect(),
            limit_is: f.limit_is.clone(),
        }
    }
}

impl Repeated {
    /// Adds one run's figure, as `butler-bench --json` prints it, to the figure of the same
    /// scenario and metric in `figures`, or as a new one.
    pub fn add(figures: &mut Vec<Repeated>, line: &str) -> anyhow::Result<()> {
        let figure: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("a figure that is not JSON ({e}): {line}"))?;
        let text = |key: &str| figure[key].as_str().map(str::to_owned);
        let (Some(scenario), Some(metric), Some(unit), Some(value)) = (
            text("scenario"),
            text("metric"),
            text("unit"),
            figure["value"].as_f64(),
        ) else {
            anyhow::bail!("a figure without scenario, metric, unit or value: {line}");
        };
        let index = match figures
            .iter()
            .position(|f| f.scenario == scenario && f.metric == metric)
        {
            Some(index) => index,
            None => {
                figures.push(Repeated {
                    scenario,
                    metric,
                    unit,
                    values: Vec::new(),
                    limits: Vec::new(),
                    limit_is: text("limit_is"),
                });
                figures.len() - 1
            }
        };
        let found = &mut figures[index];
        found.values.push(value);
        found.limits.extend(figure["limit"].as_f64());
        Ok(())
    }
}

/// Median, lowest and highest of `samples`, which must not be empty.
fn spread(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

/// Prints figures measured in one run or several: a figure of several runs shows each value
/// and limit as the median, with the lowest and highest beside it (`_min` and `_max`, and
/// the number of `runs`, in JSON).
pub fn print_repeated(figures: &[Repeated], json: bool) {
    if json {
        for f in figures {
            println!("{}", json_line(f));
        }
        return;
    }
    let cell = |samples: &[f64], unit: &str| {
        if samples.is_empty() {
            return String::new();
        }
        let (median, low, high) = spread(samples);
        match samples.len() {
            1 => format!("{} {unit}", round(median)),
            _ => format!("{} {unit} ({}–{})", round(median), round(low), round(high)),
        }
    };
    let rows: Vec<[String; 5]> = figures
        .iter()
        .map(|f| {
            [
                f.scenario.clone(),
                f.metric.clone(),
                cell(&f.values, &f.unit),
                cell(&f.limits, &f.unit),
                f.limit_is.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&rows);
}

/// A figure as one JSON object: `value` and `limit`, and for several runs their medians with
/// `_min`, `_max` and `runs`.
fn json_line(f: &Repeated) -> serde_json::Value {
    let repeated = f.values.len() > 1;
    let mut line = json!({
        "scenario": f.scenario,
        "metric": f.metric,
        "unit": f.unit,
    });
    if repeated {
        line["runs"] = json!(f.values.len());
    }
    for (key, samples) in [("value", &f.values), ("limit", &f.limits)] {
        if samples.is_empty() {
            continue;
        }
        let (median, low, high) = spread(samples);
        line[key] = json!(round(median));
        if repeated {
            line[format!("{key}_min")] = json!(round(low));
            line[format!("{key}_max")] = json!(round(high));
        }
    }
    if let Some(what) = &f.limit_is {
        line["limit_is"] = json!(what);
    }
    line
}

/// Prints `rows` under the figures' header, each column as wide as its widest cell.
fn print_table(rows: &[[String; 5]]) {
    let header = ["SCENARIO", "METRIC", "VALUE", "LIMIT", "LIMIT IS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(rows) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_a_figure_come_together_with_their_median_and_range() {
        let mut figures = Vec::new();
        for (value, limit) in [(3.0, 10.0), (1.0, 12.0), (2.0, 11.0), (9.0, 9.0)] {
            let line = json!({"scenario": "noop", "metric": "tasks", "value": value,
                              "unit": "tasks/s", "limit": limit, "limit_is": "commits"});
            Repeated::add(&mut figures, &line.to_string()).unwrap();
            let other = json!({"scenario": "noop", "metric": "cpu", "value": 1.0, "unit": "us"});
            Repeated::add(&mut figures, &other.to_string()).unwrap();
        }
        assert_eq!(figures.len(), 2);
        assert_eq!(figures[0].metric, "tasks");
        assert_eq!(figures[0].values, [3.0, 1.0, 2.0, 9.0]);
        assert_eq!(spread(&figures[0].values), (2.5, 1.0, 9.0));
        assert_eq!(spread(&figures[0].limits), (10.5, 9.0, 12.0));
        assert_eq!(figures[1].limits, Vec::<f64>::new());
    }

    #[test]
    fn one_run_prints_value_and_limit_and_several_runs_add_their_range() {
        let once = Repeated::from(&Figure::new("noop", "tasks", 5.0, "tasks/s").limit(7.0, "c"));
        assert_eq!(
            json_line(&once),
            json!({"scenario": "noop", "metric": "tasks", "unit": "tasks/s", "value": 5.0,
                   "limit": 7.0, "limit_is": "c"})
        );
        let mut twice = once.clone();
        twice.values.push(3.0);
        twice.limits.push(9.0);
        assert_eq!(
            json_line(&twice),
            json!({"scenario": "noop", "metric": "tasks", "unit": "tasks/s", "runs": 2,
                   "value": 4.0, "value_min": 3.0, "value_max": 5.0,
                   "limit": 8.0, "limit_min": 7.0, "limit_max": 9.0, "limit_is": "c"})
        );
    }

    #[test]
    fn a_line_that_is_no_figure_is_refused_and_shown() {
        let err = Repeated::add(&mut Vec::new(), "preparing runs").unwrap_err();
        assert!(err.to_string().contains("preparing runs"), "{err}");
        let err = Repeated::add(&mut Vec::new(), r#"{"scenario": "noop"}"#).unwrap_err();
        assert!(err.to_string().contains("without"), "{err}");
    }
}
