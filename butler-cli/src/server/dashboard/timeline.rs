//! A run's attempts over time, from its event log, laid out as a Gantt chart: one row per
//! attempt, a bar from its start to its end coloured by how it ended, and a thin lead-in for
//! the time it waited in the queue.

use std::collections::HashMap;

use butler_core::model::Event;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::format::{axis_label, span, truncate};
use crate::output;

const LABEL_WIDTH: f64 = 170.0;
const PLOT_WIDTH: f64 = 980.0;
const AXIS_HEIGHT: f64 = 26.0;
const ROW_HEIGHT: f64 = 24.0;
const BAR_HEIGHT: f64 = 14.0;
const RIGHT_MARGIN: f64 = 20.0;
/// Bars are at least this wide, so instant attempts stay visible.
const MIN_BAR: f64 = 3.0;
/// Tick spacings to choose from, in milliseconds.
const STEPS: [u64; 23] = [
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    15_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    10_800_000,
    21_600_000,
    43_200_000,
    86_400_000,
    172_800_000,
    604_800_000,
];
/// The chart spans at least this long, so an instant run is not stretched across it.
const MIN_SPAN_SECONDS: f64 = 0.5;

/// One attempt of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The task's id.
    pub task: String,
    /// The attempt's number.
    pub try_number: u32,
    /// When it was queued, if the log says.
    pub queued: Option<DateTime<Utc>>,
    /// When it started running.
    pub start: DateTime<Utc>,
    /// When it stopped running; `None` while it runs.
    pub end: Option<DateTime<Utc>>,
    /// The state it ended in (`succeeded`, `up_for_retry`, …), or `running`.
    pub outcome: String,
    /// Why it ended, from the event that ended it.
    pub reason: String,
}

/// Every attempt in `events` (one run's, oldest first), in the order they started.
///
/// An attempt starts with its task's move to `running` and ends with the task's next move out
/// of `running` for the same try.
pub fn attempts(events: &[Event]) -> Vec<Attempt> {
    let mut out: Vec<Attempt> = Vec::new();
    let mut open: HashMap<(&str, u32), usize> = HashMap::new();
    let mut queued: HashMap<(&str, u32), DateTime<Utc>> = HashMap::new();
    for event in events {
        let Some(task) = event.task_id.as_deref() else {
            continue;
        };
        let key = (task, event.try_number.unwrap_or(0));
        if event.to == "queued" {
            queued.insert(key, event.at);
        }
        if event.to == "running" {
            open.insert(key, out.len());
            out.push(Attempt {
                task: task.to_owned(),
                try_number: key.1,
                queued: queued.get(&key).copied(),
                start: event.at,
                end: None,
                outcome: "running".to_owned(),
                reason: event.reason.clone(),
            });
        } else if event.from == "running"
            && let Some(index) = open.remove(&key)
        {
            let attempt = &mut out[index];
            attempt.end = Some(event.at);
            attempt.outcome = event.to.clone();
            attempt.reason = event.reason.clone();
        }
    }
    out
}

/// The laid-out chart.
#[derive(Debug, Clone, Serialize)]
pub struct Gantt {
    /// Width of the drawing, in pixels.
    pub width: f64,
    /// Height of the drawing, in pixels.
    pub height: f64,
    /// Where the plot starts (right of the labels).
    pub plot_x: f64,
    /// Where the plot ends.
    pub plot_end: f64,
    /// Where the axis line is.
    pub axis_y: f64,
    /// One row per attempt.
    pub rows: Vec<Row>,
    /// Time marks along the top.
    pub ticks: Vec<Tick>,
}

/// One attempt's row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The task's id.
    pub task: String,
    /// The attempt's number.
    pub try_number: u32,
    /// `task #try`, cut when long.
    pub label: String,
    /// Top of the row.
    pub y: f64,
    /// Vertical centre of the row, for its label.
    pub mid: f64,
    /// The bar.
    pub bar: Bar,
    /// The queue wait before it, when known and visible.
    pub wait: Option<Bar>,
    /// Tooltip: what happened, how long it took.
    pub title: String,
    /// The state it ended in, or `running`.
    pub outcome: String,
    /// Where its label leads: the attempt's log.
    pub href: String,
}

/// A horizontal bar.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

/// A time mark on the axis.
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    /// Its position.
    pub x: f64,
    /// Time since the chart's start: `30s`, `1m`.
    pub label: String,
}

/// The chart of `attempts`, with unfinished attempts drawn up to `now` and each row's label
/// leading to `href(task, try)`; `None` without any attempt.
pub fn gantt(
    attempts: &[Attempt],
    now: DateTime<Utc>,
    href: impl Fn(&str, u32) -> String,
) -> Option<Gantt> {
    let first = attempts.first()?;
    let start = attempts
        .iter()
        .map(|a| a.queued.unwrap_or(a.start).min(a.start))
        .min()
        .unwrap_or(first.start);
    let end = attempts
        .iter()
        .map(|a| a.end.unwrap_or(now).max(a.start))
        .max()
        .unwrap_or(first.start);
    let total = span(start, end).as_secs_f64().max(MIN_SPAN_SECONDS);
    let total_ms = total * 1000.0;
    let step = STEPS
        .iter()
        .copied()
        .find(|&s| total_ms / s as f64 <= 8.0)
        .unwrap_or(STEPS[STEPS.len() - 1]);
    let scale = PLOT_WIDTH / total;
    let x_at = |at: DateTime<Utc>| LABEL_WIDTH + span(start, at).as_secs_f64() * scale;

    let mut ticks = Vec::new();
    let mut t = 0u64;
    while t as f64 <= total_ms {
        ticks.push(Tick {
            x: LABEL_WIDTH + t as f64 / 1000.0 * scale,
            label: if step < 1000 && t > 0 {
                format!("{:.1}s", t as f64 / 1000.0)
            } else {
                axis_label(t / 1000)
            },
        });
        t += step;
    }

    let rows = attempts
        .iter()
        .enumerate()
        .map(|(i, attempt)| {
            let y = AXIS_HEIGHT + i as f64 * ROW_HEIGHT;
            let bar_y = y + (ROW_HEIGHT - BAR_HEIGHT) / 2.0;
            let x = x_at(attempt.start);
            let bar_end = x_at(attempt.end.unwrap_or(now).max(attempt.start));
            let bar = Bar {
                x,
                y: bar_y,
                w: (bar_end - x).max(MIN_BAR),
                h: BAR_HEIGHT,
            };
            let wait = attempt.queued.and_then(|queued| {
                let wx = x_at(queued);
                (x - wx >= 1.0).then_some(Bar {
                    x: wx,
                    y: y + ROW_HEIGHT / 2.0 - 1.5,
                    w: x - wx,
                    h: 3.0,
                })
            });
            let ran = output::duration(span(attempt.start, attempt.end.unwrap_or(now)));
            let mut title = match attempt.end {
                Some(_) => format!(
                    "{} try {}: {} after {ran}",
                    attempt.task, attempt.try_number, attempt.outcome
                ),
                None => format!(
                    "{} try {}: running for {ran}",
                    attempt.task, attempt.try_number
                ),
            };
            if let Some(queued) = attempt.queued {
                title.push_str(&format!(
                    ", queued {} before",
                    output::duration(span(queued, attempt.start))
                ));
            }
            if attempt.end.is_some() && !attempt.reason.is_empty() {
                title.push_str(&format!(" ({})", attempt.reason));
            }
            Row {
                task: attempt.task.clone(),
                try_number: attempt.try_number,
                label: truncate(&format!("{} #{}", attempt.task, attempt.try_number), 24),
                y,
                mid: y + ROW_HEIGHT / 2.0,
                bar,
                wait,
                title,
                outcome: attempt.outcome.clone(),
                href: href(&attempt.task, attempt.try_number),
            }
        })
        .collect::<Vec<_>>();
    Some(Gantt {
        width: LABEL_WIDTH + PLOT_WIDTH + RIGHT_MARGIN,
        height: AXIS_HEIGHT + rows.len() as f64 * ROW_HEIGHT + 6.0,
        plot_x: LABEL_WIDTH,
        plot_end: LABEL_WIDTH + PLOT_WIDTH,
        axis_y: AXIS_HEIGHT - 6.0,
        rows,
        ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).expect("a time")
    }

    fn event(ms: i64, task: Option<&str>, try_number: u32, from: &str, to: &str) -> Event {
        Event {
            id: ms,
            at: at(ms),
            run_id: 1,
            task_id: task.map(str::to_owned),
            try_number: task.map(|_| try_number),
            from: from.to_owned(),
            to: to.to_owned(),
            by: "worker".to_owned(),
            reason: format!("{from} to {to}"),
        }
    }

    #[test]
    fn attempts_pair_each_start_with_the_end_of_the_same_try() {
        let events = vec![
            event(0, None, 0, "ready", "scheduled"),
            event(10, Some("a"), 1, "pending", "queued"),
            event(20, Some("a"), 1, "queued", "running"),
            event(1020, Some("a"), 1, "running", "up_for_retry"),
            event(1500, Some("a"), 2, "up_for_retry", "queued"),
            event(1600, Some("a"), 2, "queued", "running"),
            event(1700, Some("b"), 1, "pending", "queued"),
            event(1800, Some("b"), 1, "queued", "running"),
            event(2600, Some("a"), 2, "running", "succeeded"),
        ];
        let attempts = attempts(&events);
        let summary: Vec<(&str, u32, &str, Option<i64>)> = attempts
            .iter()
            .map(|a| {
                (
                    a.task.as_str(),
                    a.try_number,
                    a.outcome.as_str(),
                    a.end
                        .map(|e| e.timestamp_millis() - at(0).timestamp_millis()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", 1, "up_for_retry", Some(1020)),
                ("a", 2, "succeeded", Some(2600)),
                ("b", 1, "running", None),
            ]
        );
        assert_eq!(attempts[1].queued, Some(at(1500)));
    }

    #[test]
    fn the_chart_spans_every_attempt_and_draws_running_ones_to_now() {
        let events = vec![
            event(0, Some("a"), 1, "pending", "queued"),
            event(1000, Some("a"), 1, "queued", "running"),
            event(11_000, Some("a"), 1, "running", "failed"),
            event(12_000, Some("b"), 1, "queued", "running"),
        ];
        let attempts = attempts(&events);
        let chart = gantt(&attempts, at(61_000), |t, n| format!("{t}/{n}")).expect("a chart");
        assert_eq!(chart.rows.len(), 2);
        let (a, b) = (&chart.rows[0], &chart.rows[1]);
        assert!(a.wait.is_some(), "the queue wait shows before the bar");
        assert_eq!(b.href, "b/1");
        assert!(a.bar.x < b.bar.x);
        // b runs until now, the end of the chart.
        let right = b.bar.x + b.bar.w;
        assert!(
            (right - chart.plot_end).abs() < 0.5,
            "{right} vs {}",
            chart.plot_end
        );
        assert!(a.title.contains("failed after 10.0s"), "{}", a.title);
        assert!(b.title.contains("running for 49.0s"), "{}", b.title);
        let labels: Vec<&str> = chart.ticks.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels.first(), Some(&"0s"));
        assert!(labels.len() >= 4 && labels.len() <= 9, "{labels:?}");
        assert!(
            labels.contains(&"30s") || labels.contains(&"1m"),
            "{labels:?}"
        );
        assert!(gantt(&[], at(0), |_, _| String::new()).is_none());

        // A run of a fraction of a second gets ticks in tenths.
        let quick = super::attempts(&[
            event(0, Some("a"), 1, "queued", "running"),
            event(300, Some("a"), 1, "running", "succeeded"),
        ]);
        let chart = gantt(&quick, at(300), |_, _| String::new()).expect("a chart");
        let labels: Vec<&str> = chart.ticks.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels, ["0s", "0.1s", "0.2s", "0.3s", "0.4s", "0.5s"]);
        let bar = &chart.rows[0].bar;
        assert!((bar.w - PLOT_WIDTH * 0.6).abs() < 0.5, "{bar:?}");
    }
}
