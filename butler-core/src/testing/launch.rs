//! Runs launched into a store in one call, for tests of the engine.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;

use crate::definition::{Definition, Format};
use crate::model::Id;
use crate::store::DynRunStore;
use crate::tracker::{RunSource, Tracker};

/// Registers the workflow of TOML `definition` and an analysis in `store`, and launches `count`
/// runs of it (run configs `{"n": 0}`, `{"n": 1}`, …); their ids.
///
/// # Panics
///
/// When the definition is invalid or the store refuses a step: a test's setup failed.
pub async fn launch_runs(store: Arc<DynRunStore>, definition: &str, count: usize) -> Vec<Id> {
    let tracker = Tracker::new(store);
    let definition =
        Definition::parse(definition, Format::Toml, "test.toml").expect("a valid definition");
    let workflow = tracker
        .create_workflow("w", "1", json!({}), definition)
        .await
        .expect("workflow");
    let analysis = tracker
        .create_analysis("a", Utc::now().date_naive(), json!({}))
        .await
        .expect("analysis");
    let sources = (0..count)
        .map(|n| RunSource {
            source: None,
            config: json!({ "n": n }),
        })
        .collect();
    tracker
        .launch(workflow.id, analysis.id, sources, false)
        .await
        .expect("launch")
        .into_iter()
        .map(|run| run.id)
        .collect()
}
