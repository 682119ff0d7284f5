//! `list`: `list-runs` filtered by analysis and status over 1,000,000 runs.

use std::time::{Duration, Instant};

use butler_core::RunStore;
use butler_core::model::{RunFilter, RunStatus};

use super::{ANALYSES, Args, fixture, median, open_store, seed_runs};
use crate::report::Figure;

const REPEATS: usize = 25;

pub async fn run(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let total = args.size.unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let store = open_store(dir.path(), args.durability).await?;
    let (tracker, workflow, first_analysis) = fixture(&store).await?;

    let analyses = seed_runs(&store, &tracker, workflow, first_analysis, total, 10).await?;

    let target = analyses[ANALYSES / 2];
    let mut figures = Vec::new();
    for status in [RunStatus::Error, RunStatus::Completed] {
        let filter = RunFilter {
            analysis_id: Some(target),
            status: Some(status),
            ..RunFilter::default()
        };
        let mut rows = 0;
        let mut butler = Vec::new();
        for _ in 0..REPEATS {
            let start = Instant::now();
            rows = store.list_runs(&filter).await?.len();
            butler.push(start.elapsed());
        }
        let mut floor = Vec::new();
        for _ in 0..REPEATS {
            let start = Instant::now();
            let ids: Vec<(i64,)> = sqlx::query_as(
                "SELECT id FROM runs WHERE analysis_id = ? AND status = ? ORDER BY id",
            )
            .bind(target)
            .bind(status.as_str())
            .fetch_all(store.pool())
            .await?;
            floor.push(start.elapsed());
            anyhow::ensure!(
                ids.len() == rows,
                "floor query found {} rows, list_runs {rows}",
                ids.len()
            );
        }
        figures.push(
            Figure::new(
                "list",
                format!("list {rows} {status} runs of one analysis among {total}"),
                ms(median(butler)),
                "ms",
            )
            .limit(ms(median(floor)), "index scan of the run ids alone"),
        );
    }
    Ok(figures)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
