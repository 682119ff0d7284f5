//! The read path of the hot loop: one read-only connection per database file and process, on a
//! thread of its own, that runs each caller's reads as one call.
//!
//! Through the pool, every statement and every row of a read was a round trip to the
//! connection's thread; the scheduler and the workers read thousands of rows a second that way,
//! and much of those threads' time went to switching. Here a caller sends its reads (a closure)
//! once and gets its decoded rows back once, like a writer's caller (see `writer.rs`).
//!
//! Each closure runs outside any transaction, so every statement reads the latest commit (the
//! write-ahead log lets it run while a writer commits) and no snapshot outlives it to hold back
//! the checkpoints.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, mpsc};

use butler_core::{Error, Result};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use super::writer::{PerProcess, Target, Threaded, sqlite_error};

/// Prepared statements kept: the hot reads use about ten, `list_runs` a few more.
const STATEMENT_CACHE: usize = 32;

/// Reads sent to the reader's thread; each answers its own caller.
type Read = Box<dyn FnOnce(&Connection) + Send>;

/// One read-only connection on its own thread. Dropping the last handle ends the thread and
/// closes the connection.
pub(crate) struct Reader {
    target: Target,
    location: Arc<str>,
    reads: Mutex<Option<mpsc::Sender<Read>>>,
    /// The process that started the thread: a forked child inherits the registry but not
    /// the thread, so it must open its own reader.
    pid: u32,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The readers of this process, by what they open: stores on one file share one.
static READERS: PerProcess<Reader> = PerProcess::new();

impl Threaded for Reader {
    fn pid(&self) -> u32 {
        self.pid
    }
}

impl Reader {
    /// The reader of the database `target` names: the one already running in this process, or
    /// a new one. An in-memory database must be held open already (by its writer), or the
    /// reader would open a new, empty one.
    pub(crate) async fn shared(target: &Target, location: &str) -> Result<Arc<Reader>> {
        if let Some(reader) = READERS.get(target) {
            return Ok(reader);
        }
        let opened = tokio::task::spawn_blocking({
            let target = target.clone();
            let location = location.to_owned();
            move || Self::open(target, &location)
        })
        .await
        .map_err(|e| Error::backend(format!("cannot open {location} for reading"), e))??;
        // Another caller may have opened one meanwhile: keep the first.
        Ok(READERS.keep(target, opened))
    }

    /// Opens the connection and starts its thread.
    fn open(target: Target, location: &str) -> Result<Arc<Reader>> {
        let doing = "open the database for reading";
        let conn = target
            .connect(OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| sqlite_error(location, doing, &e))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let (reads, queue) = mpsc::channel::<Read>();
        std::thread::Builder::new()
            .name("butler-sqlite-reader".to_owned())
            .spawn(move || serve(&conn, &queue))
            .map_err(|e| Error::unavailable(format!("cannot {doing}: no thread for it"), e))?;
        Ok(Arc::new(Reader {
            target,
            location: location.into(),
            reads: Mutex::new(Some(reads)),
            pid: std::process::id(),
        }))
    }

    /// Runs `read` on the reader's connection, outside any transaction, and answers what it
    /// answered. `doing` names the read in errors.
    pub(crate) async fn run<T, F>(&self, doing: &str, read: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Read = Box::new(move |conn| {
            let _ = reply.send(read(conn));
        });
        {
            let reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            let sent = reads.as_ref().map(|reads| reads.send(job));
            if !matches!(sent, Some(Ok(()))) {
                return Err(Error::unavailable(
                    format!(
                        "cannot {doing}: the reader of {} is closed or has stopped",
                        self.location
                    ),
                    "the store was closed",
                ));
            }
        }
        answer.await.map_err(|_| {
            Error::backend(
                format!(
                    "cannot {doing}: the reader of {} failed while doing it",
                    self.location
                ),
                "the read panicked; report this as a bug in butler",
            )
        })?
    }

    /// Stops taking reads; the thread finishes those it has and closes the connection.
    pub(crate) fn close(&self) {
        self.reads.lock().unwrap_or_else(|e| e.into_inner()).take();
        READERS.forget(&self.target, self);
    }
}

/// The reader's thread: runs each read as it comes.
fn serve(conn: &Connection, queue: &mpsc::Receiver<Read>) {
    while let Ok(read) = queue.recv() {
        // A read that panics drops its reply, and its caller answers that it failed.
        let _ = catch_unwind(AssertUnwindSafe(|| read(conn)));
        if !conn.is_autocommit() {
            // A read that began a transaction and did not end it would hold its snapshot, and
            // every later read would miss the commits made since.
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new file with a table `t (v TEXT)` in WAL mode, and what a reader or writer opens.
    fn database(dir: &tempfile::TempDir) -> Target {
        let path = dir.path().join("r.db");
        let conn = Connection::open(&path).expect("create");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v TEXT)")
            .expect("schema");
        Target {
            path: path.to_string_lossy().into_owned(),
            memory: false,
            synchronous: 1,
            busy_timeout_ms: 1000,
        }
    }

    fn count(reader: &Reader) -> impl Future<Output = Result<i64>> + '_ {
        reader.run("count", |conn| {
            conn.prepare_cached("SELECT count(*) FROM t")
                .and_then(|mut s| s.query_row([], |row| row.get(0)))
                .map_err(|e| sqlite_error("the test database", "count", &e))
        })
    }

    #[tokio::test]
    async fn reads_see_every_commit_and_keep_no_snapshot() {
        let dir = tempfile::tempdir().expect("dir");
        let target = database(&dir);
        let reader = Reader::open(target.clone(), "the test database").expect("reader");
        let writer = Connection::open(&target.path).expect("open");
        assert_eq!(count(&reader).await.expect("count"), 0);
        for n in 1..=3 {
            writer
                .execute("INSERT INTO t (v) VALUES ('x')", [])
                .expect("insert");
            assert_eq!(count(&reader).await.expect("count"), n);
        }
        // A read that leaves its transaction open by mistake is ended after it.
        reader
            .run("begin", |conn| {
                conn.execute_batch("BEGIN")
                    .and_then(|()| conn.query_row("SELECT count(*) FROM t", [], |_| Ok(())))
                    .map_err(|e| sqlite_error("the test database", "begin", &e))
            })
            .await
            .expect("begin");
        writer
            .execute("INSERT INTO t (v) VALUES ('x')", [])
            .expect("insert");
        assert_eq!(count(&reader).await.expect("count"), 4);
        // A truncating checkpoint copies the whole log only if no reader holds a snapshot.
        let busy: i64 = writer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))
            .expect("checkpoint");
        assert_eq!(busy, 0, "no read holds the log");
    }

    #[tokio::test]
    async fn a_read_that_panics_fails_alone_and_a_closed_reader_refuses_reads() {
        let dir = tempfile::tempdir().expect("dir");
        let reader = Reader::open(database(&dir), "the test database").expect("reader");
        let err = reader
            .run("panic", |_| -> Result<()> { panic!("a bug") })
            .await
            .expect_err("panicked");
        assert!(err.to_string().contains("panic"), "{err}");
        assert_eq!(count(&reader).await.expect("count after a panic"), 0);
        reader.close();
        let err = count(&reader).await.expect_err("closed");
        assert!(err.is_retryable(), "{err:?}");
    }
}
