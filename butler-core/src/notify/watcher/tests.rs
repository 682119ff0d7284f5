//! The watcher's decisions, against the in-memory store.

use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::json;

use super::*;
use crate::change::{Change, RunChange};
use crate::definition::{Definition, Format};
use crate::memory::MemoryRunStore;
use crate::model::WorkerInfo;
use crate::notify::{AlertKind, Notifier};
use crate::store::RunStore;
use crate::tracker::{RunSource, Tracker};

const TASKS: &str = "[[tasks]]\nid = \"a\"\nrun = \"true\"\n";

struct World {
    store: Arc<MemoryRunStore>,
    tracker: Tracker,
    analysis: Id,
}

impl World {
    async fn new() -> World {
        let store = Arc::new(MemoryRunStore::new());
        let tracker = Tracker::new(store.clone());
        let analysis = tracker
            .create_analysis("hello", Utc::now().date_naive(), json!({}))
            .await
            .expect("analysis")
            .id;
        World {
            store,
            tracker,
            analysis,
        }
    }

    /// Registers workflow `name` 1.0 whose definition starts with `head`.
    async fn workflow(&self, name: &str, head: &str) -> Id {
        let text = format!("{head}\n{TASKS}");
        let definition = Definition::parse(&text, Format::Toml, "wf.toml").expect("definition");
        self.tracker
            .create_workflow(name, "1.0", json!({}), definition)
            .await
            .expect("workflow")
            .id
    }

    async fn launch(&self, workflow: Id, count: usize) -> Vec<Id> {
        let sources = (0..count)
            .map(|i| RunSource {
                source: None,
                config: json!({ "i": i, "nonce": uuid::Uuid::new_v4().to_string() }),
            })
            .collect();
        self.tracker
            .launch(workflow, self.analysis, sources, false)
            .await
            .expect("launch")
            .into_iter()
            .map(|run| run.id)
            .collect()
    }

    async fn moves(
        &self,
        run: Id,
        from: RunStatus,
        to: RunStatus,
        error: Option<&str>,
        at: Option<DateTime<Utc>>,
    ) {
        let applied = self
            .store
            .apply(vec![vec![Change::Run(RunChange {
                run_id: run,
                expect: from,
                status: to,
                error: error.map(str::to_owned),
                started_at: at,
                ended_at: to.is_finished().then(Utc::now),
                by: "test".to_owned(),
                reason: error.unwrap_or("test").to_owned(),
            })]])
            .await
            .expect("apply");
        assert_eq!(applied, [true], "run {run} moves from {from} to {to}");
    }

    /// Puts run `run` in progress, started at `started`.
    async fn start(&self, run: Id, started: DateTime<Utc>) {
        self.moves(run, RunStatus::Ready, RunStatus::Scheduled, None, None)
            .await;
        self.moves(
            run,
            RunStatus::Scheduled,
            RunStatus::InProgress,
            None,
            Some(started),
        )
        .await;
    }

    async fn fail(&self, run: Id, why: &str) {
        self.start(run, Utc::now()).await;
        self.moves(
            run,
            RunStatus::InProgress,
            RunStatus::Error,
            Some(why),
            None,
        )
        .await;
    }

    async fn complete(&self, run: Id) {
        self.start(run, Utc::now()).await;
        self.moves(run, RunStatus::InProgress, RunStatus::Completed, None, None)
            .await;
    }

    async fn watcher(&self, routes: Routes) -> Watcher {
        let mut options = WatcherOptions::new(Duration::from_secs(15));
        options.check_every = Duration::ZERO;
        options.leader = None;
        Watcher::new(self.store.clone(), routes, options)
            .await
            .expect("watcher")
    }
}

fn routes() -> Routes {
    Routes {
        on_failure: vec!["ops".into()],
        on_overdue: vec!["ops".into()],
        on_worker_lost: vec!["pager".into()],
        ..Routes::default()
    }
}

fn kinds(dispatches: &[Dispatch]) -> Vec<(AlertKind, Option<Id>, Vec<String>)> {
    dispatches
        .iter()
        .map(|d| (d.alert.kind, d.alert.run_id, d.to.clone()))
        .collect()
}

fn minutes(n: i64) -> chrono::Duration {
    chrono::Duration::minutes(n)
}

#[tokio::test]
async fn a_failed_run_is_alerted_once_with_its_reason_and_link() {
    let world = World::new().await;
    let workflow = world.workflow("align", "").await;
    let runs = world.launch(workflow, 3).await;
    let mut watcher = world.watcher(routes()).await;
    world.fail(runs[1], "task `a` failed: exit code 3").await;
    world.complete(runs[0]).await;

    let now = Utc::now();
    let sent = watcher.check(now).await.unwrap();
    assert_eq!(
        kinds(&sent),
        [(AlertKind::RunFailed, Some(runs[1]), vec!["ops".into()])]
    );
    let alert = &sent[0].alert;
    assert_eq!(alert.workflow.as_deref(), Some("align"));
    assert_eq!(alert.workflow_version.as_deref(), Some("1.0"));
    assert_eq!(alert.analysis.as_deref(), Some("hello"));
    assert_eq!(
        alert.reason.as_deref(),
        Some("task `a` failed: exit code 3")
    );
    assert_eq!(alert.link, Some(format!("/runs/{}", runs[1])));
    assert_eq!(alert.title, format!("Run {} failed: align 1.0", runs[1]));
    assert!(alert.body.contains("exit code 3"), "{}", alert.body);

    assert!(watcher.check(now).await.unwrap().is_empty(), "sent once");
    assert!(watcher.check(now + minutes(1)).await.unwrap().is_empty());

    // A reset run that fails again is a new failure.
    world
        .moves(runs[1], RunStatus::Error, RunStatus::Ready, None, None)
        .await;
    world.fail(runs[1], "task `a` failed: exit code 4").await;
    let again = watcher.check(now).await.unwrap();
    assert_eq!(
        kinds(&again),
        [(AlertKind::RunFailed, Some(runs[1]), vec!["ops".into()])]
    );
    assert_eq!(
        again[0].alert.reason.as_deref(),
        Some("task `a` failed: exit code 4")
    );
}

#[tokio::test]
async fn after_a_restart_old_failures_are_not_sent_again() {
    let world = World::new().await;
    let workflow = world.workflow("align", "").await;
    let runs = world.launch(workflow, 2).await;
    let mut first = world.watcher(routes()).await;
    world.fail(runs[0], "boom").await;
    assert_eq!(first.check(Utc::now()).await.unwrap().len(), 1);
    drop(first);

    let mut restarted = world.watcher(routes()).await;
    assert!(restarted.check(Utc::now()).await.unwrap().is_empty());
    world.fail(runs[1], "boom").await;
    assert_eq!(
        kinds(&restarted.check(Utc::now()).await.unwrap()),
        [(AlertKind::RunFailed, Some(runs[1]), vec!["ops".into()])]
    );
}

#[tokio::test]
async fn a_workflow_routes_its_own_alerts() {
    let world = World::new().await;
    let team = world
        .workflow("team", "[notify]\non_failure = [\"team-hook\"]")
        .await;
    let quiet = world.workflow("quiet", "[notify]\non_failure = []").await;
    let plain = world.workflow("plain", "").await;
    let runs = [
        world.launch(team, 1).await[0],
        world.launch(quiet, 1).await[0],
        world.launch(plain, 1).await[0],
    ];
    let mut watcher = world.watcher(routes()).await;
    for run in runs {
        world.fail(run, "boom").await;
    }
    let mut sent = kinds(&watcher.check(Utc::now()).await.unwrap());
    sent.sort_by_key(|(_, run, _)| *run);
    assert_eq!(
        sent,
        [
            (
                AlertKind::RunFailed,
                Some(runs[0]),
                vec!["team-hook".into()]
            ),
            (AlertKind::RunFailed, Some(runs[2]), vec!["ops".into()]),
        ]
    );
}

#[tokio::test]
async fn an_overdue_run_is_alerted_once_and_one_overdue_before_the_start_never() {
    let world = World::new().await;
    let slow = world.workflow("slow", "expected_duration = \"1h\"").await;
    let unbounded = world.workflow("unbounded", "").await;
    let runs = world.launch(slow, 2).await;
    let other = world.launch(unbounded, 1).await[0];
    let mut watcher = world.watcher(routes()).await;
    let t0 = watcher.started();
    world.start(runs[0], t0 - minutes(30)).await;
    // Already overdue when the watcher started: a previous watcher's to tell.
    world.start(runs[1], t0 - minutes(120)).await;
    world.start(other, t0 - minutes(600)).await;

    assert!(watcher.check(t0 + minutes(10)).await.unwrap().is_empty());
    let sent = watcher.check(t0 + minutes(31)).await.unwrap();
    assert_eq!(
        kinds(&sent),
        [(AlertKind::RunOverdue, Some(runs[0]), vec!["ops".into()])]
    );
    let alert = &sent[0].alert;
    assert_eq!(
        alert.reason.as_deref(),
        Some("running for 1h 1m, expected to take 1h")
    );
    assert!(alert.body.contains("It keeps running"), "{}", alert.body);
    assert!(
        watcher.check(t0 + minutes(45)).await.unwrap().is_empty(),
        "sent once"
    );
    assert!(watcher.check(t0 + minutes(300)).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_lost_worker_is_alerted_once_per_silence() {
    let world = World::new().await;
    let mut watcher = world.watcher(routes()).await;
    let t0 = watcher.started();
    let worker = |name: &str, heartbeat_at: DateTime<Utc>| WorkerInfo {
        name: name.to_owned(),
        host: "node-7".to_owned(),
        pid: 4242,
        queue: "butler.tasks".to_owned(),
        slots: 4,
        running: 2,
        version: "0.1.0".to_owned(),
        started_at: t0 - minutes(60),
        heartbeat_at,
    };
    world
        .store
        .heartbeat_worker(&worker("gpu-1", t0))
        .await
        .unwrap();
    // Lost long before the watcher started.
    world
        .store
        .heartbeat_worker(&worker("old", t0 - minutes(60)))
        .await
        .unwrap();
    let secs = chrono::Duration::seconds;

    assert!(watcher.check(t0 + secs(10)).await.unwrap().is_empty());
    let sent = watcher.check(t0 + secs(20)).await.unwrap();
    assert_eq!(
        kinds(&sent),
        [(AlertKind::WorkerLost, None, vec!["pager".into()])]
    );
    assert_eq!(sent[0].alert.worker.as_deref(), Some("gpu-1"));
    assert_eq!(sent[0].alert.title, "Worker gpu-1 lost");
    assert!(
        sent[0].alert.body.contains("host node-7"),
        "{}",
        sent[0].alert.body
    );
    assert!(
        watcher.check(t0 + secs(40)).await.unwrap().is_empty(),
        "sent once"
    );

    // It comes back, then falls silent again: a new loss.
    world
        .store
        .heartbeat_worker(&worker("gpu-1", t0 + secs(50)))
        .await
        .unwrap();
    assert!(watcher.check(t0 + secs(55)).await.unwrap().is_empty());
    let again = watcher.check(t0 + secs(70)).await.unwrap();
    assert_eq!(
        kinds(&again),
        [(AlertKind::WorkerLost, None, vec!["pager".into()])]
    );

    // A restarted watcher leaves alone the workers lost before it started.
    world
        .store
        .heartbeat_worker(&worker("gpu-1", t0 - secs(20)))
        .await
        .unwrap();
    let mut restarted = world.watcher(routes()).await;
    assert!(
        restarted
            .check(restarted.started() + secs(1))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn the_report_counts_runs_per_workflow_over_its_period() {
    let world = World::new().await;
    let align = world.workflow("align", "").await;
    let call = world.workflow("call", "").await;
    let a = world.launch(align, 4).await;
    let c = world.launch(call, 2).await;
    world.complete(a[3]).await; // before the watcher: not in its first period
    let mut routes = routes();
    routes.on_failure.clear();
    routes.report = vec!["ops".into(), "mail".into()];
    routes.report_every = Duration::from_secs(3600);
    let mut watcher = world.watcher(routes).await;
    let t0 = watcher.started();
    world.complete(a[0]).await;
    world.complete(a[1]).await;
    world.fail(a[2], "boom").await;
    world.start(c[0], t0).await;
    assert!(watcher.check(t0 + minutes(30)).await.unwrap().is_empty());

    let sent = watcher.check(t0 + minutes(61)).await.unwrap();
    assert_eq!(
        kinds(&sent),
        [(AlertKind::Report, None, vec!["ops".into(), "mail".into()])]
    );
    let report = &sent[0].alert;
    let counts: Vec<(&str, u64, u64, u64)> = report
        .counts
        .iter()
        .map(|c| (c.workflow.as_str(), c.completed, c.failed, c.running))
        .collect();
    assert_eq!(counts, [("align", 2, 1, 0), ("call", 0, 0, 1)]);
    assert_eq!(
        report.title,
        "Butler report: 2 completed, 1 failed, 1 running"
    );
    assert_eq!(report.since, Some(t0));

    assert!(watcher.check(t0 + minutes(90)).await.unwrap().is_empty());
    world
        .moves(
            c[0],
            RunStatus::InProgress,
            RunStatus::Completed,
            None,
            None,
        )
        .await;
    let next = watcher.check(t0 + minutes(122)).await.unwrap();
    let counts: Vec<(&str, u64, u64, u64)> = next[0]
        .alert
        .counts
        .iter()
        .map(|c| (c.workflow.as_str(), c.completed, c.failed, c.running))
        .collect();
    assert_eq!(counts, [("call", 1, 0, 0)], "a new period counts afresh");
}

/// Records what it is sent.
#[derive(Debug, Default)]
struct Recorder {
    alerts: Mutex<Vec<Alert>>,
}

#[async_trait]
impl Notifier for Recorder {
    async fn send(&self, alert: &Alert) -> Result<()> {
        self.alerts.lock().unwrap().push(alert.clone());
        Ok(())
    }
}

impl Recorder {
    fn runs(&self) -> Vec<Option<Id>> {
        self.alerts
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.run_id)
            .collect()
    }

    async fn wait_for(&self, count: usize) -> Vec<Option<Id>> {
        for _ in 0..200 {
            if self.alerts.lock().unwrap().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.runs()
    }
}

#[tokio::test]
async fn only_the_process_whose_scheduler_leads_sends() {
    let world = World::new().await;
    let workflow = world.workflow("align", "").await;
    let runs = world.launch(workflow, 2).await;
    let mut options = WatcherOptions::new(Duration::from_secs(15));
    options.poll = Duration::from_millis(10);
    options.leader = Some("here/1".to_owned());
    let watcher = Watcher::new(world.store.clone(), routes(), options)
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let handle = watcher.start(BTreeMap::from([(
        "ops".to_owned(),
        recorder.clone() as Arc<DynNotifier>,
    )]));
    let ttl = Duration::from_secs(60);

    assert!(
        world
            .store
            .try_lead(SCHEDULER_ROLE, "elsewhere/2 #1", ttl)
            .await
            .unwrap()
    );
    world.fail(runs[0], "boom").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(recorder.runs().is_empty(), "a follower sends nothing");

    world
        .store
        .resign(SCHEDULER_ROLE, "elsewhere/2 #1")
        .await
        .unwrap();
    assert!(
        world
            .store
            .try_lead(SCHEDULER_ROLE, "here/1 #3", ttl)
            .await
            .unwrap()
    );
    world.fail(runs[1], "boom").await;
    assert_eq!(recorder.wait_for(1).await, [Some(runs[1])]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        recorder.runs(),
        [Some(runs[1])],
        "the leader's failure, once"
    );
    assert_eq!(handle.stats("ops").unwrap().snapshot(), (1, 0, 0));
    handle.stop().await;
}
