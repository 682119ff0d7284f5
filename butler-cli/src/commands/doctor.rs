//! `doctor`: checks that Butler can run here, one line per check.

use std::fmt::Display;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use butler_core::DynRunStore;
use butler_core::engine::{DEFAULT_TASK_QUEUE, SCHEDULER_ROLE};
use butler_core::executor::{Attempt, CancellationToken, Executor};
use butler_core::queue::DynQueue;
use butler_providers::connect;
use butler_providers::local::LocalExecutor;
use chrono::Utc;

use super::workers::state;
use crate::output;
use crate::settings::Settings;

/// Below this much free space in `BUTLER_HOME`, logs and the database may soon fail to grow.
const MIN_FREE_BYTES: u64 = 1 << 30;
/// Below this share of the disk free, likewise.
const MIN_FREE_PERCENT: f64 = 5.0;
/// The longest one check may take: an unreachable server must not hang the doctor.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// Workers named in the workers line; the rest are counted.
const NAMED_WORKERS: usize = 5;

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Passed.
    Ok,
    /// Failed: Butler cannot work until it is fixed.
    Fail,
    /// Worth knowing, but work can go on.
    Warn,
    /// For information.
    Info,
    /// Not checked, because a check it needs failed.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Fail => "FAIL",
            Status::Warn => "warn",
            Status::Info => "info",
            Status::Skip => "skip",
        }
    }
}

/// The lines printed so far and the checks that failed.
struct Report<'a, W: Write> {
    out: &'a mut W,
    failed: Vec<&'static str>,
}

impl<W: Write> Report<'_, W> {
    fn line(&mut self, status: Status, check: &'static str, message: impl Display) -> Result<()> {
        if status == Status::Fail {
            self.failed.push(check);
        }
        writeln!(self.out, "{:<5} {check:<10} {message}", status.label())?;
        // Each line shows as soon as its check ends, however long the next one takes.
        self.out.flush()?;
        Ok(())
    }
}

/// Runs every check, printing one line each; fails if any check failed.
pub async fn run(settings: &Settings, out: &mut impl Write) -> Result<()> {
    let mut report = Report {
        out,
        failed: Vec::new(),
    };
    let store_url = redact(settings.store_url());
    let opened = within(open(settings)).await;
    let backends = match opened {
        Ok(backends) => match within(backends.store.list_workflows()).await {
            Ok(workflows) => {
                report.line(
                    Status::Ok,
                    "store",
                    format!(
                        "{store_url}: reachable and migrated ({} {})",
                        workflows.len(),
                        if workflows.len() == 1 {
                            "workflow"
                        } else {
                            "workflows"
                        }
                    ),
                )?;
                Some(backends)
            }
            Err(err) => {
                report.line(
                    Status::Fail,
                    "store",
                    format!(
                        "{store_url}: opened, but cannot be read: {}. Fix: check that the \
                         database was set up by this version of butler",
                        output::error_message(&err)
                    ),
                )?;
                None
            }
        },
        Err(err) => {
            report.line(
                Status::Fail,
                "store",
                format!(
                    "{store_url}: cannot be opened: {}. Fix: point --db (BUTLER_DB) at a \
                     reachable store",
                    output::error_message(&err)
                ),
            )?;
            None
        }
    };

    check_queue(settings, backends.as_ref().map(|b| &b.queue), &mut report).await?;
    check_executor(&mut report).await?;
    check_disk(settings.home(), &mut report)?;
    match &backends {
        Some(backends) => {
            check_scheduler(&backends.store, &mut report).await?;
            check_workers(settings, &backends.store, &mut report).await?;
        }
        None => {
            for check in ["scheduler", "workers"] {
                report.line(
                    Status::Skip,
                    check,
                    "not checked: the store cannot be opened",
                )?;
            }
        }
    }

    if !report.failed.is_empty() {
        bail!(
            "{} {} failed: {}",
            report.failed.len(),
            if report.failed.len() == 1 {
                "check"
            } else {
                "checks"
            },
            report.failed.join(", ")
        );
    }
    Ok(())
}

/// The store and its own queue (the queue of `--queue` is opened by [`check_queue`]).
async fn open(settings: &Settings) -> Result<connect::Backends> {
    settings.create_home()?;
    Ok(connect::connect(settings.store_url(), None).await?)
}

/// Runs `check` for at most [`CHECK_TIMEOUT`].
async fn within<T, E: Into<anyhow::Error>>(
    check: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => bail!("no answer within {}s", CHECK_TIMEOUT.as_secs()),
    }
}

async fn check_queue<W: Write>(
    settings: &Settings,
    own: Option<&Arc<DynQueue>>,
    report: &mut Report<'_, W>,
) -> Result<()> {
    let (queue, described) = match (settings.queue_url(), own) {
        (None, None) => {
            return report.line(
                Status::Skip,
                "queue",
                "not checked: the queue lives in the store, which cannot be opened",
            );
        }
        (None, Some(queue)) => (Ok(queue.clone()), "the store's queue".to_owned()),
        (Some(url), _) => {
            let opened = within(connect::connect(settings.store_url(), Some(url))).await;
            (opened.map(|b| b.queue), redact(url))
        }
    };
    let depth = match queue {
        Ok(queue) => within(queue.depth(DEFAULT_TASK_QUEUE)).await,
        Err(err) => Err(err),
    };
    match depth {
        Ok(depth) => report.line(
            Status::Ok,
            "queue",
            format!(
                "{described}: reachable; {DEFAULT_TASK_QUEUE} has {} ready, {} delayed, {} \
                 leased, {} dead-lettered",
                depth.ready, depth.delayed, depth.leased, depth.dead
            ),
        ),
        Err(err) => report.line(
            Status::Fail,
            "queue",
            format!(
                "{described}: {}. Fix: point --queue (BUTLER_QUEUE) at a reachable queue, or \
                 leave it out to use the store's own",
                output::error_message(&err)
            ),
        ),
    }
}

/// Runs `/bin/sh -c true` as a task attempt would run, in a scratch directory.
async fn check_executor<W: Write>(report: &mut Report<'_, W>) -> Result<()> {
    let workdir = std::env::temp_dir().join(format!("butler-doctor-{}", std::process::id()));
    let attempt = Attempt {
        run_id: 0,
        task_id: "doctor".to_owned(),
        try_number: 1,
        command: "true".to_owned(),
        env: Default::default(),
        workdir: workdir.clone(),
        config: serde_json::json!({}).into(),
        timeout: Some(CHECK_TIMEOUT),
    };
    let started = Instant::now();
    let result = LocalExecutor::new()
        .execute(attempt, CancellationToken::new())
        .await;
    let _ = std::fs::remove_dir_all(&workdir);
    let fix = format!(
        "Fix: check that /bin/sh runs and that {} is writable",
        std::env::temp_dir().display()
    );
    match result {
        Ok(finished) if finished.outcome.succeeded() => report.line(
            Status::Ok,
            "executor",
            format!(
                "`/bin/sh -c true` ran as a task attempt in {}",
                output::duration(started.elapsed())
            ),
        ),
        Ok(finished) => report.line(
            Status::Fail,
            "executor",
            format!("`/bin/sh -c true` ended with {}. {fix}", finished.outcome),
        ),
        Err(err) => report.line(
            Status::Fail,
            "executor",
            format!("cannot run `/bin/sh -c true`: {err}. {fix}"),
        ),
    }
}

/// Free space on the disk of `home` (or of its nearest existing parent).
fn check_disk<W: Write>(home: &Path, report: &mut Report<'_, W>) -> Result<()> {
    let path = existing_ancestor(home);
    let stats = match nix::sys::statvfs::statvfs(&path) {
        Ok(stats) => stats,
        Err(err) => {
            return report.line(
                Status::Fail,
                "disk",
                format!(
                    "cannot read the free space of {}: {err}. Fix: set BUTLER_HOME to a \
                     directory on a mounted, readable disk",
                    path.display()
                ),
            );
        }
    };
    // The counts are 32 bits wide on some targets, 64 on others.
    #[allow(clippy::useless_conversion)]
    let (block, available, blocks) = (
        u64::from(stats.fragment_size()),
        u64::from(stats.blocks_available()),
        u64::from(stats.blocks()),
    );
    let free = available.saturating_mul(block);
    let total = blocks.saturating_mul(block);
    let percent = if total == 0 {
        0.0
    } else {
        free as f64 * 100.0 / total as f64
    };
    let summary = format!(
        "{} free of {} ({percent:.0}%) in {}",
        bytes(free),
        bytes(total),
        path.display()
    );
    if free < MIN_FREE_BYTES || percent < MIN_FREE_PERCENT {
        report.line(
            Status::Fail,
            "disk",
            format!(
                "only {summary}. Fix: free space there (keep at least {} and {MIN_FREE_PERCENT}%), \
                 or set BUTLER_HOME to a larger disk",
                bytes(MIN_FREE_BYTES)
            ),
        )
    } else {
        report.line(Status::Ok, "disk", summary)
    }
}

async fn check_scheduler<W: Write>(
    store: &Arc<DynRunStore>,
    report: &mut Report<'_, W>,
) -> Result<()> {
    match within(store.leader(SCHEDULER_ROLE)).await {
        Ok(Some(lease)) if lease.is_held(Utc::now()) => report.line(
            Status::Ok,
            "scheduler",
            format!(
                "{} leads, since {}",
                lease.holder,
                lease.since.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        ),
        Ok(_) => report.line(
            Status::Warn,
            "scheduler",
            "no scheduler is running; start `butler server` or `butler scheduler`",
        ),
        Err(err) => report.line(
            Status::Fail,
            "scheduler",
            format!(
                "cannot read the scheduler's lease: {}. Fix: check the store",
                output::error_message(&err)
            ),
        ),
    }
}

async fn check_workers<W: Write>(
    settings: &Settings,
    store: &Arc<DynRunStore>,
    report: &mut Report<'_, W>,
) -> Result<()> {
    let lost_after = settings.lost_after()?;
    let workers = match within(store.list_workers()).await {
        Ok(workers) => workers,
        Err(err) => {
            return report.line(
                Status::Fail,
                "workers",
                format!(
                    "cannot list the workers: {}. Fix: check the store",
                    output::error_message(&err)
                ),
            );
        }
    };
    let now = Utc::now();
    let (alive, lost): (Vec<_>, Vec<_>) = workers
        .iter()
        .partition(|worker| state(worker, now, lost_after) == "alive");
    if alive.is_empty() && lost.is_empty() {
        return report.line(
            Status::Info,
            "workers",
            "none is running; tasks run once `butler worker` or `butler server` starts",
        );
    }
    let names = |list: &[&butler_core::model::WorkerInfo]| {
        let mut named: Vec<String> = list
            .iter()
            .take(NAMED_WORKERS)
            .map(|w| w.name.clone())
            .collect();
        if list.len() > NAMED_WORKERS {
            named.push(format!("and {} more", list.len() - NAMED_WORKERS));
        }
        named.join(", ")
    };
    let slots: u64 = alive.iter().map(|w| u64::from(w.slots)).sum();
    let mut message = format!("{} alive with {slots} slots", alive.len());
    if !alive.is_empty() {
        message.push_str(&format!(" ({})", names(&alive)));
    }
    if !lost.is_empty() {
        message.push_str(&format!(
            "; {} lost ({}): see `butler list-workers`",
            lost.len(),
            names(&lost)
        ));
    }
    report.line(Status::Info, "workers", message)
}

/// `path` or its nearest parent that exists.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

/// A size in binary units: `512 MiB`, `61.2 GiB`.
fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `url` with the password of its user info, if any, hidden: `postgres://me:***@db/butler`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            redact("postgres://me:secret@db:5432/butler?sslmode=require"),
            "postgres://me:***@db:5432/butler?sslmode=require"
        );
        assert_eq!(redact("amqp://guest@mq/%2f"), "amqp://guest@mq/%2f");
        assert_eq!(redact("sqlite:///tmp/a@b:c.db"), "sqlite:///tmp/a@b:c.db");
        assert_eq!(redact("/var/lib/butler.db"), "/var/lib/butler.db");
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
        assert_eq!(bytes(61 * (1 << 30) + (1 << 29)), "61.5 GiB");
        assert_eq!(bytes(300 * (1 << 20)), "300 MiB");
    }

    #[test]
    fn the_disk_of_a_home_not_yet_created_is_its_parents() {
        let dir = std::env::temp_dir();
        assert_eq!(existing_ancestor(&dir.join("not/yet/there")), dir);
    }
}
