//! The write path of the hot loop: one connection per database file and process, on a thread of
//! its own, that runs each caller's work as one call and commits the work that arrived together
//! in one transaction.
//!
//! The pool's driver hands every statement to its connection's thread and back; a task's changes
//! took a few such round trips each, and a third of the engine's time went to switching threads.
//! Here a caller sends its whole batch (a closure) once and gets one answer, and the thread runs
//! the closures it finds waiting in one `BEGIN IMMEDIATE` transaction: one commit, one fsync, for
//! all of them. When one fails, the transaction is rolled back, that one answers its error and
//! the others run again in a new transaction, so a failure undoes only its own writes (savepoints
//! would do the same, at the price of journaling every page each closure changes).
//!
//! SQLite lets one connection write at a time. Writers of one process share one connection (see
//! [`Writer::shared`]), so they queue here instead of meeting on the file's lock, where SQLite's
//! busy handler sleeps for whole milliseconds; writers in other processes still meet on the lock,
//! and wait for it up to the busy timeout.

use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once, OnceLock, Weak, mpsc};
use std::time::Duration;

use butler_core::engine::metrics::{STORE_COMMITS, STORE_TRANSACTION_DURATION};
use butler_core::{Error, Result};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use sqlx::SqlitePool;
use tokio::sync::oneshot;

/// The writer's page cache, in KiB: filled only as pages are read, up to this.
const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// The most pieces of work committed by one transaction.
const MAX_GROUP: usize = 256;

/// How often a group runs again after SQLite gave up its transaction on its own.
const MAX_ROUNDS: u32 = 3;

/// Prepared statements kept per connection: the hot path uses about twenty-five.
const STATEMENT_CACHE: usize = 64;

/// The least time between two checkpoints of the write-ahead log, so that a busy writer's
/// commits share one.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// How often a writer whose ready-runs bell has a listener looks whether another process
/// changed the database ([`Writer::watch_other_processes`]). SQLite tells no process of
/// another's commits; `PRAGMA data_version` reads a counter in the shared log index, a few
/// microseconds, so looking this often costs nothing noticeable and keeps a run launched by
/// another process (`butler launch-workflow` beside `butler server`) from waiting for the
/// scheduler's poll.
const OTHER_PROCESSES_EVERY: Duration = Duration::from_millis(20);

/// The newest `ready` run, by the index the scheduler claims them by.
const NEWEST_READY_RUN: &str = "SELECT max(id) FROM runs WHERE status = 'ready'";

/// The connection a [`Writer`] (and a reader of the same database) opens: the file, and the
/// settings its pool runs with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Target {
    /// The database file as SQLite names it, or the name of an in-memory database.
    pub path: String,
    /// Whether `path` names an in-memory database of the `memdb` VFS rather than a file.
    pub memory: bool,
    /// `PRAGMA synchronous`: 0 off, 1 normal, 2 full, 3 extra.
    pub synchronous: i64,
    /// `PRAGMA busy_timeout`, in milliseconds.
    pub busy_timeout_ms: i64,
}

impl Target {
    /// Opens a connection to the database, with `flags` and the busy timeout.
    pub(crate) fn connect(&self, flags: OpenFlags) -> rusqlite::Result<Connection> {
        let flags = flags | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = if self.memory {
            Connection::open_with_flags_and_vfs(&self.path, flags, c"memdb")
        } else {
            Connection::open_with_flags(PathBuf::from(&self.path), flags)
        }?;
        conn.busy_timeout(Duration::from_millis(
            u64::try_from(self.busy_timeout_ms).unwrap_or(0),
        ))?;
        Ok(conn)
    }
}

/// A connection with a thread of its own (a [`Writer`] or a reader), which a forked child
/// cannot use: it has the handle but not the thread.
pub(crate) trait Threaded {
    /// The process that started the thread.
    fn pid(&self) -> u32;
}

/// One threaded connection per database and process, shared by the stores and queues that open
/// it; kept weakly, so that the last handle dropped ends the thread.
pub(crate) struct PerProcess<T> {
    map: OnceLock<Mutex<HashMap<Target, Weak<T>>>>,
}

impl<T: Threaded> PerProcess<T> {
    pub(crate) const fn new() -> Self {
        PerProcess {
            map: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Weak<T>>> {
        self.map
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The one of `target` this process runs, if any.
    pub(crate) fn get(&self, target: &Target) -> Option<Arc<T>> {
        self.lock()
            .get(target)
            .and_then(Weak::upgrade)
            .filter(|t| t.pid() == std::process::id())
    }

    /// Keeps `opened` for `target`, unless another was kept meanwhile: answers the one kept.
    pub(crate) fn keep(&self, target: &Target, opened: Arc<T>) -> Arc<T> {
        let mut map = self.lock();
        if let Some(kept) = map
            .get(target)
            .and_then(Weak::upgrade)
            .filter(|t| t.pid() == std::process::id())
        {
            return kept;
        }
        map.retain(|_, t| t.strong_count() > 0);
        map.insert(target.clone(), Arc::downgrade(&opened));
        opened
    }

    /// Forgets `closing`, if it is the one kept for `target`.
    pub(crate) fn forget(&self, target: &Target, closing: &T) {
        let mut map = self.lock();
        if map
            .get(target)
            .is_some_and(|t| std::ptr::eq(t.as_ptr(), closing))
        {
            map.remove(target);
        }
    }
}

/// A piece of work sent to the writer's thread.
trait Work: Send {
    /// Runs the work inside the open transaction, keeping its outcome; answers whether it
    /// succeeded. Work may run again, after a rollback, when other work of its group failed.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the outcome kept by the last run, unless the transaction failed (`failure`).
    fn answer(self: Box<Self>, failure: Option<&rusqlite::Error>);
}

/// A closure, what it is doing (for errors), its outcome, and where its answer goes.
struct Job<F, T> {
    doing: String,
    location: Arc<str>,
    work: F,
    out: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<F, T> Work for Job<F, T>
where
    F: Fn(&Connection) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        self.out = None;
        let out = (self.work)(conn);
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn answer(self: Box<Self>, failure: Option<&rusqlite::Error>) {
        let out = match (self.out, failure) {
            (Some(Err(e)), _) => Err(e),
            (_, Some(e)) => Err(sqlite_error(&self.location, &self.doing, e)),
            (Some(Ok(value)), None) => Ok(value),
            (None, None) => Err(Error::backend(
                format!("cannot {}: the work failed while writing", self.doing),
                "it panicked; report this as a bug in butler",
            )),
        };
        let _ = self.reply.send(out);
    }
}

/// Maps a SQLite failure while `doing` something in the database `location` names to Butler's
/// error: busy, locked, I/O, full and cannot-open are worth retrying, the rest is a backend
/// failure.
pub(crate) fn sqlite_error(location: &str, doing: &str, err: &rusqlite::Error) -> Error {
    let code = err.sqlite_error().map_or(0, |e| e.extended_code);
    // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
    if matches!(code & 0xff, 5 | 6 | 10 | 13 | 14) {
        Error::unavailable(
            format!(
                "cannot {doing}: {location} is busy or unreachable; try again, and check that \
                 its disk has room and the file is readable and writable (a busy database \
                 waits up to busy_timeout_ms)"
            ),
            err.to_string(),
        )
    } else {
        Error::backend(format!("cannot {doing} in {location}"), err.to_string())
    }
}

/// One write connection on its own thread. Dropping the last handle ends the thread and closes
/// the connection.
pub(crate) struct Writer {
    target: Target,
    location: Arc<str>,
    jobs: Mutex<Option<mpsc::Sender<Box<dyn Work>>>>,
    /// The process that started the thread: a forked child inherits the registry but not
    /// the thread, so it must open its own writer.
    pid: u32,
    /// Rung when runs became `ready` through any store of this process on the database, and,
    /// once [`Writer::watch_other_processes`] started, through another process.
    pub(crate) ready_runs: butler_core::ReadyRunsBell,
    /// Starts the watch of other processes' changes once.
    watching: Once,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The writers of this process, by what they open: stores and queues on one file share one.
static WRITERS: PerProcess<Writer> = PerProcess::new();

impl Threaded for Writer {
    fn pid(&self) -> u32 {
        self.pid
    }
}

impl Writer {
    /// The writer of the database `pool` is open on, with the pool's `synchronous` and busy
    /// timeout: the one already running in this process, or a new one.
    ///
    /// An in-memory database (of the `memdb` VFS, named by the pool's filename) gets a new
    /// writer only when `owner` says the caller made it: a store opening its database does; a
    /// queue on a store's pool finds the store's writer.
    pub(crate) async fn shared(
        pool: &SqlitePool,
        owner: bool,
        location: &str,
    ) -> Result<Arc<Writer>> {
        let doing = "read the database's settings";
        let (file, synchronous, busy_timeout_ms): (String, i64, i64) = sqlx::query_as(
            "SELECT (SELECT file FROM pragma_database_list WHERE name = 'main'), \
             (SELECT synchronous FROM pragma_synchronous), \
             (SELECT timeout FROM pragma_busy_timeout)",
        )
        .fetch_one(pool)
        .await
        .map_err(|e| Error::unavailable(format!("cannot {doing} of {location}"), e))?;
        // SQLite names no file for a database in memory.
        let memory = file.is_empty();
        let path = if memory {
            pool.connect_options()
                .get_filename()
                .to_string_lossy()
                .into_owned()
        } else {
            file
        };
        let target = Target {
            path,
            memory,
            synchronous,
            busy_timeout_ms,
        };
        if let Some(writer) = WRITERS.get(&target) {
            return Ok(writer);
        }
        if memory && !owner {
            return Err(Error::InvalidInput(format!(
                "{location} is an in-memory database that this queue cannot write to; open \
                 the queue on a database file, or on the pool of a SqliteStore opened with \
                 sqlite::memory:"
            )));
        }
        let opened = tokio::task::spawn_blocking({
            let target = target.clone();
            let location = location.to_owned();
            move || Self::open(target, &location)
        })
        .await
        .map_err(|e| Error::backend(format!("cannot open {location} for writing"), e))??;
        // Another caller may have opened one meanwhile: keep the first.
        Ok(WRITERS.keep(&target, opened))
    }

    /// Opens the connection and starts its thread.
    fn open(target: Target, location: &str) -> Result<Arc<Writer>> {
        let doing = "open the database for writing";
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let conn = target
            .connect(flags)
            .map_err(|e| sqlite_error(location, doing, &e))?;
        let setup = || -> rusqlite::Result<()> {
            conn.pragma_update(None, "synchronous", target.synchronous)?;
            // No foreign-key checks: this connection writes only the engine's changes to
            // rows it has just read in the same transaction, and the queue's tables, which
            // have no foreign keys. A check would look up the run of every event inserted,
            // and make SQLite journal every page such an insert changes in case it fails.
            conn.pragma_update(None, "foreign_keys", false)?;
            // The engine's writes keep the run counts per transaction themselves
            // (`store/engine/apply.rs`) rather than by the per-row trigger that every other
            // connection fires; nothing else this connection writes has a trigger.
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
            // A statement that may fail halfway journals the pages it changes: in memory, not
            // in a temporary file.
            conn.pragma_update(None, "temp_store", "MEMORY")?;
            // Every change reads the pages of the rows and indexes it writes; with SQLite's
            // default of 2 MiB, a store of a few ten thousand active runs read them back from
            // the file (the log) on every commit.
            conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
            if !target.memory {
                // The pool switched the file to WAL already; this only confirms it.
                let mode: String =
                    conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
                if !mode.eq_ignore_ascii_case("wal") {
                    return Err(rusqlite::Error::InvalidQuery);
                }
                // The checkpointer's thread copies the log into the file (see
                // [`checkpoints`]), not this one's commits.
                conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            }
            conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            Ok(())
        };
        setup().map_err(|e| sqlite_error(location, doing, &e))?;

        let checkpointer = if target.memory {
            None
        } else {
            let checkpointer = target
                .connect(flags)
                .and_then(|c| {
                    c.pragma_update(None, "synchronous", target.synchronous)?;
                    Ok(c)
                })
                .map_err(|e| sqlite_error(location, doing, &e))?;
            let (nudge, nudges) = mpsc::sync_channel::<()>(1);
            std::thread::Builder::new()
                .name("butler-sqlite-checkpointer".to_owned())
                .spawn(move || checkpoints(&checkpointer, &nudges))
                .map_err(|e| Error::unavailable(format!("cannot {doing}: no thread for it"), e))?;
            Some(nudge)
        };
        let (jobs, queue) = mpsc::channel::<Box<dyn Work>>();
        let name = "butler-sqlite-writer".to_owned();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(&conn, &queue, checkpointer.as_ref()))
            .map_err(|e| Error::unavailable(format!("cannot {doing}: no thread for it"), e))?;
        Ok(Arc::new(Writer {
            target,
            location: location.into(),
            jobs: Mutex::new(Some(jobs)),
            pid: std::process::id(),
            ready_runs: butler_core::ReadyRunsBell::default(),
            watching: Once::new(),
        }))
    }

    /// Rings [`Writer::ready_runs`] also when another process launches runs: from now on, and
    /// until the last handle of this writer is dropped, a thread looks every
    /// [`OTHER_PROCESSES_EVERY`] whether the database changed since it last looked and, if it
    /// did, whether a newer run is `ready` than the newest it saw. Runs that wait (for
    /// `max_active_runs`, say) ring no more than once; a run another process resets is still
    /// found at the scheduler's poll. An in-memory database has no other process.
    pub(crate) fn watch_other_processes(self: &Arc<Self>) {
        if self.target.memory {
            return;
        }
        self.watching.call_once(|| {
            let (target, writer) = (self.target.clone(), Arc::downgrade(self));
            let started = std::thread::Builder::new()
                .name("butler-sqlite-watcher".to_owned())
                .spawn(move || watch(&target, &writer));
            if let Err(e) = started {
                tracing::warn!(
                    database = %self.location,
                    error = %e,
                    "no thread to watch other processes' launches; they start at the next poll"
                );
            }
        });
    }

    /// The database, as named in messages.
    pub(crate) fn location(&self) -> &Arc<str> {
        &self.location
    }

    /// What the writer opened, for a reader of the same database.
    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// Runs `work` on the writer's connection inside a write transaction, and answers once that
    /// transaction has committed (or failed). `doing` names the work in errors. Work that fails
    /// changes nothing; work that succeeds is durable when this returns. `work` may run more than
    /// once (each time after its earlier writes were rolled back), so it must read everything
    /// it decides on inside the transaction.
    pub(crate) async fn run<T, F>(&self, doing: String, work: F) -> Result<T>
    where
        F: Fn(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let stopped = |doing: &str| {
            Error::unavailable(
                format!(
                    "cannot {doing}: the writer of {} is closed or has stopped",
                    self.location
                ),
                "the store was closed",
            )
        };
        let job: Box<dyn Work> = Box::new(Job {
            doing: doing.clone(),
            location: Arc::clone(&self.location),
            work,
            out: None,
            reply,
        });
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let sent = jobs.as_ref().map(|jobs| jobs.send(job));
            if !matches!(sent, Some(Ok(()))) {
                return Err(stopped(&doing));
            }
        }
        answer.await.map_err(|_| {
            Error::backend(
                format!(
                    "cannot {doing}: the writer of {} failed while doing it",
                    self.location
                ),
                "the work panicked; report this as a bug in butler",
            )
        })?
    }

    /// Stops taking work; the thread finishes what it has and closes the connection.
    pub(crate) fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        WRITERS.forget(&self.target, self);
    }
}

/// The writer's thread: takes the work waiting, runs it in one transaction, answers, and
/// nudges the checkpointer (if the database has a log to checkpoint).
fn serve(
    conn: &Connection,
    queue: &mpsc::Receiver<Box<dyn Work>>,
    checkpointer: Option<&mpsc::SyncSender<()>>,
) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let began = std::time::Instant::now();
        run_group(conn, group);
        metrics::histogram!(STORE_TRANSACTION_DURATION).record(began.elapsed());
        if let Some(checkpointer) = checkpointer {
            // A nudge already waiting covers this commit too.
            let _ = checkpointer.try_send(());
        }
    }
}

/// The watcher's thread of [`Writer::watch_other_processes`]; ends with the writer.
fn watch(target: &Target, writer: &Weak<Writer>) {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = match target.connect(flags) {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(
                database = %target.path,
                error = %e,
                "cannot watch other processes' launches; they start at the next poll"
            );
            return;
        }
    };
    let (mut seen, mut newest) = (None, None);
    loop {
        std::thread::sleep(OTHER_PROCESSES_EVERY);
        let Some(writer) = writer.upgrade() else {
            return;
        };
        // A failed look (the file busy past the timeout) is tried again at the next.
        let Ok(version) = conn.query_row("PRAGMA data_version", [], |row| row.get::<_, i64>(0))
        else {
            continue;
        };
        if seen == Some(version) {
            continue;
        }
        seen = Some(version);
        let ready = conn
            .prepare_cached(NEWEST_READY_RUN)
            .and_then(|mut statement| statement.query_row([], |row| row.get::<_, Option<i64>>(0)));
        if let Ok(Some(id)) = ready
            && newest < Some(id)
        {
            newest = Some(id);
            writer.ready_runs.ring();
        }
    }
}

/// The checkpointer's thread: after the writer's commits, at most every [`CHECKPOINT_EVERY`],
/// copies the pages of the write-ahead log back into the database file, so that the log
/// stays short (and is started afresh once all of it is copied and no reader needs it).
///
/// Copying is SQLite's own automatic checkpoint, moved off the writer's thread: there it took
/// a fifth of the writer's time, every thousand pages, in the middle of some caller's commit.
/// A `PASSIVE` checkpoint never waits for readers or writers; what it cannot copy yet, the
/// next one does. It ends when the writer's thread does.
fn checkpoints(conn: &Connection, nudges: &mpsc::Receiver<()>) {
    let mut last = std::time::Instant::now();
    while nudges.recv().is_ok() {
        if let Some(wait) = CHECKPOINT_EVERY.checked_sub(last.elapsed()) {
            std::thread::sleep(wait);
        }
        last = std::time::Instant::now();
        let copied = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        if let Err(e) = copied {
            // The next nudge tries again; a log that keeps growing shows in its file size.
            tracing::debug!(error = %e, "checkpoint of the SQLite write-ahead log failed");
        }
    }
}

/// Runs `group` in one transaction; when a piece fails, rolls back, answers it, and runs the
/// rest again in a new one.
fn run_group(conn: &Connection, mut group: Vec<Box<dyn Work>>) {
    let mut rounds = 0;
    while !group.is_empty() {
        rounds += 1;
        let changes_before = conn.total_changes();
        if let Err(e) = statement(conn, "BEGIN IMMEDIATE") {
            for work in group {
                work.answer(Some(&e));
            }
            return;
        }
        let mut failed = None;
        let mut lost = false;
        for (index, work) in group.iter_mut().enumerate() {
            // A panic leaves the work without an outcome; it answers that it failed.
            if !catch_unwind(AssertUnwindSafe(|| work.run(conn))).unwrap_or(false) {
                failed = Some(index);
                break;
            }
            // SQLite may give up a transaction on its own (a full disk, an I/O error) while
            // the work went on.
            if conn.is_autocommit() {
                lost = true;
                break;
            }
        }
        if lost {
            if rounds < MAX_ROUNDS {
                continue;
            }
            let e = rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("SQLite rolled the transaction back".to_owned()),
            );
            for work in group {
                work.answer(Some(&e));
            }
            return;
        }
        let Some(failed) = failed else {
            let committed = statement(conn, "COMMIT");
            match committed {
                // A transaction that changed no row writes nothing to the log and needs no
                // fsync, so it is not counted.
                Ok(()) if conn.total_changes() != changes_before => {
                    metrics::counter!(STORE_COMMITS).increment(1);
                }
                Ok(()) => {}
                Err(_) => rollback(conn),
            }
            for work in group {
                work.answer(committed.as_ref().err());
            }
            return;
        };
        rollback(conn);
        group.remove(failed).answer(None);
    }
}

fn statement(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        // A failed rollback leaves SQLite to roll back when the connection next begins.
        let _ = conn.execute_batch("ROLLBACK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer on a new file with a table `t (v TEXT UNIQUE)`.
    fn writer(dir: &tempfile::TempDir) -> Arc<Writer> {
        let path = dir.path().join("w.db");
        let conn = Connection::open(&path).expect("create");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v TEXT UNIQUE)")
            .expect("schema");
        drop(conn);
        let target = Target {
            path: path.to_string_lossy().into_owned(),
            memory: false,
            synchronous: 1,
            busy_timeout_ms: 1000,
        };
        Writer::open(target, "the test database").expect("open")
    }

    fn insert(v: &'static str) -> impl Fn(&Connection) -> Result<usize> + Send + 'static {
        move |conn| {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [v])
                .map_err(|e| sqlite_error("the test database", "insert", &e))
        }
    }

    fn rows(writer: &Writer, dir: &tempfile::TempDir) -> Vec<String> {
        let _ = writer;
        let conn = Connection::open(dir.path().join("w.db")).expect("open");
        let mut statement = conn.prepare("SELECT v FROM t ORDER BY v").expect("select");
        statement
            .query_map([], |row| row.get(0))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("rows")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_sent_together_commits_together_and_a_failure_undoes_only_its_own() {
        let dir = tempfile::tempdir().expect("dir");
        let writer = writer(&dir);
        // The first piece holds the thread, so the next three wait and run as one group.
        let hold = writer.run("hold".into(), |conn| {
            std::thread::sleep(Duration::from_millis(200));
            insert("a")(conn)
        });
        let later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tokio::join!(
                writer.run("b".into(), insert("b")),
                // Fails on the UNIQUE constraint after writing its first row.
                writer.run("c".into(), |conn| {
                    insert("c")(conn)?;
                    insert("b")(conn)
                }),
                writer.run("d".into(), insert("d")),
            )
        };
        let (held, (b, c, d)) = tokio::join!(hold, later);
        assert_eq!(held.expect("a"), 1);
        assert_eq!(b.expect("b"), 1);
        let err = c.expect_err("c repeats b");
        assert!(err.to_string().contains("insert"), "{err}");
        assert!(
            !err.is_retryable(),
            "a constraint is not worth retrying: {err:?}"
        );
        assert_eq!(d.expect("d"), 1);
        assert_eq!(
            rows(&writer, &dir),
            ["a", "b", "d"],
            "the failed piece's first row is gone, the others' rows are in"
        );
    }

    #[tokio::test]
    async fn a_closed_writer_refuses_work_as_unavailable() {
        let dir = tempfile::tempdir().expect("dir");
        let writer = writer(&dir);
        writer.close();
        let err = writer
            .run("insert".into(), insert("x"))
            .await
            .expect_err("closed");
        assert!(err.is_retryable(), "{err:?}");
        assert!(rows(&writer, &dir).is_empty());
    }
}
