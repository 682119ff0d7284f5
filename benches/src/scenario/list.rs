//! `list`: `list-runs` filtered by analysis and status over 1,000,000 runs.

use std::time::{Duration, Instant};

use butler_core::RunStore;
use butler_core::model::{RunFilter, RunStatus};
use butler_core::tracker::RunSource;

use super::{Args, fixture, median, open_store, sample_config};
use crate::report::Figure;

const ANALYSES: usize = 100;
const REPEATS: usize = 25;

pub async fn run(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let total = args.size.unwrap_or(1_000_000);
    let per_analysis = total / ANALYSES;
    let dir = tempfile::tempdir()?;
    let store = open_store(dir.path(), args.durability).await?;
    let (tracker, workflow, first_analysis) = fixture(&store).await?;

    eprintln!("preparing {total} runs in {ANALYSES} analyses…");
    let mut analyses = vec![first_analysis];
    for i in 1..ANALYSES {
        let a = tracker
            .create_analysis(
                &format!("bench-{i}"),
                chrono::Utc::now().date_naive(),
                serde_json::json!({}),
            )
            .await?;
        analyses.push(a.id);
    }
    for (n, analysis) in analyses.iter().enumerate() {
        let sources = (0..per_analysis)
            .map(|i| RunSource {
                source: None,
                config: sample_config(n * per_analysis + i),
            })
            .collect();
        tracker.launch(workflow, *analysis, sources, false).await?;
    }
    // A realistic mix of states: most runs done, some failed, some still going.
    sqlx::query(
        "UPDATE runs SET status = CASE id % 10 WHEN 0 THEN 'error' WHEN 1 THEN 'in-progress' \
         ELSE 'completed' END",
    )
    .execute(store.pool())
    .await?;
    sqlx::query("ANALYZE").execute(store.pool()).await?;

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
