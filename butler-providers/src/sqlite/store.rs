//! SQLite run store.

mod engine;
mod tokens;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use butler_core::change::ChangeSet;
use butler_core::config::{self, Config};
use butler_core::definition::Definition;
use butler_core::engine::metrics::STORE_COMMITS;
use butler_core::model::{
    Analysis, AnalysisRun, ApiToken, ConfigOwner, Event, EventFilter, Id, NewAnalysis, NewRuns,
    NewToken, NewWorkflow, RoleLease, RunFilter, RunStatus, TaskInstance, TaskState, WorkerInfo,
    Workflow,
};
use butler_core::{BoxError, Error, Kind, ReadyRunsBell, Result, RunStore};
use chrono::{DateTime, NaiveDate, Utc};
use rusqlite::types::Value;
use sqlx::error::ErrorKind;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, SqliteConnection, SqlitePool, SqliteTransaction};
use uuid::Uuid;

use super::config::{Durability, SqliteConfig};
use super::reader::Reader;
use super::writer::{Writer, sqlite_error};

/// The migrations of the tracker and the queue, applied by [`SqliteStore::open`].
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per multi-row `INSERT`; with at most 11 values a row this stays far below SQLite's
/// limit of 32766 bound values per statement.
const INSERT_CHUNK: usize = 1000;

/// Hashes per duplicate lookup, under the same limit.
const LOOKUP_CHUNK: usize = 2000;

/// The columns of `runs` in the order [`run_from_row`] reads them.
const RUN_COLUMNS: &str = "id, workflow_id, analysis_id, status, workflow_config_id, \
                           analysis_config_id, run_config_id, effective_config_id, source_file, \
                           error, created_at, started_at, ended_at";

/// Butler's run store in one SQLite database file (or in memory), the embedded default.
///
/// Cloning is cheap and shares the connection pool. Several stores, in this process or others,
/// may open the same file: SQLite's write-ahead log lets readers run while one writer commits,
/// and every write takes the write lock up front, so concurrent launches never interleave.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    config: Arc<SqliteConfig>,
    /// The connection that runs the engine's hot writes (`apply`), shared with the queue; it
    /// also holds an in-memory database open while the pool opens and closes its connections.
    writer: Arc<Writer>,
    /// The connection that runs the engine's hot reads, shared by the stores on the database.
    reader: Arc<Reader>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.config.path)
            .field("durability", &self.config.durability)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the database `config` names, creating the file and its parent directories if they
    /// are missing, and applies the migrations it lacks.
    pub async fn open(config: &SqliteConfig) -> Result<Self> {
        let location = describe(config);
        let options = connect_options(config)?;
        if !config.is_memory()
            && let Some(parent) = config.path.parent().filter(|p| !p.as_os_str().is_empty())
        {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                Error::unavailable(
                    format!(
                        "cannot create the directory {} for {location}; check its permissions \
                         or point the store elsewhere (--db, BUTLER_DB, or `db=` in Python)",
                        parent.display()
                    ),
                    e,
                )
            })?;
        }
        let pool_options = SqlitePoolOptions::new().max_connections(config.connections());
        let started = Instant::now();
        let pool = loop {
            match pool_options.clone().connect_with(options.clone()).await {
                Ok(pool) => break pool,
                // Switching a new file to WAL needs it to itself for a moment, and SQLite
                // answers "busy" at once rather than waiting when another process is doing
                // the same.
                Err(e) if is_busy(&e) && started.elapsed() < config.busy_timeout() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(open_error(&location, e)),
            }
        };
        // Before the migrations, so an in-memory database is held from here on.
        let writer = Writer::shared(&pool, true, &location).await?;
        migrate(&pool, &location).await?;
        let reader = Reader::shared(writer.target(), &location).await?;
        Ok(SqliteStore {
            pool,
            config: Arc::new(config.clone()),
            writer,
            reader,
        })
    }

    /// Opens the database named by a `sqlite:` URL (see [`SqliteConfig::from_url`]).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(&SqliteConfig::from_url(url)?).await
    }

    /// The connection pool, for other tables living in the same database (the queue).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The settings the store was opened with.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
    }

    /// Closes every connection, waiting for those in use to be returned; later calls fail as
    /// unavailable.
    pub async fn close(&self) {
        self.writer.close();
        self.reader.close();
        self.pool.close().await;
    }

    /// Maps a failure while `doing` something to Butler's error, naming the database.
    fn fail(&self, doing: &str, err: sqlx::Error) -> Error {
        map_error(&describe(&self.config), doing, err)
    }

    async fn begin_write(&self, doing: &str) -> Result<SqliteTransaction<'static>> {
        // Taking the write lock at the start means a transaction never has to upgrade a read
        // lock, which SQLite refuses at once instead of waiting for the busy timeout.
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.fail(doing, e))
    }

    async fn commit(&self, tx: SqliteTransaction<'static>, doing: &str) -> Result<()> {
        tx.commit().await.map_err(|e| self.fail(doing, e))?;
        metrics::counter!(STORE_COMMITS).increment(1);
        Ok(())
    }

    fn corrupt(&self, what: &str, source: BoxError) -> Error {
        corrupt(&describe(&self.config), what, source)
    }

    /// Runs `read` on the reader's thread, with the context of its errors; `doing` names it.
    async fn read<T, F>(&self, doing: String, read: F) -> Result<T>
    where
        F: FnOnce(&rusqlite::Connection, Context<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let location = describe(&self.config);
        self.reader
            .run(&doing.clone(), move |conn| {
                let cx = Context {
                    location: &location,
                    doing: &doing,
                };
                read(conn, cx)
            })
            .await
    }

    async fn exists(
        &self,
        conn: &mut SqliteConnection,
        sql: &'static str,
        key: impl ToString,
        doing: &str,
    ) -> Result<bool> {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(key.to_string())
            .fetch_optional(conn)
            .await
            .map(|row| row.is_some())
            .map_err(|e| self.fail(doing, e))
    }

    /// Fails with `NotFound` when the launch names a workflow, analysis or config layer that
    /// does not exist.
    async fn check_references(&self, conn: &mut SqliteConnection, launch: &NewRuns) -> Result<()> {
        let doing = "check the launch's workflow and analysis";
        let checks: [(&'static str, Kind, String); 4] = [
            (
                "SELECT 1 FROM workflows WHERE id = ?",
                Kind::Workflow,
                launch.workflow_id.to_string(),
            ),
            (
                "SELECT 1 FROM analyses WHERE id = ?",
                Kind::Analysis,
                launch.analysis_id.to_string(),
            ),
            (
                "SELECT 1 FROM configs WHERE id = ?",
                Kind::Config,
                launch.workflow_config_id.to_string(),
            ),
            (
                "SELECT 1 FROM configs WHERE id = ?",
                Kind::Config,
                launch.analysis_config_id.to_string(),
            ),
        ];
        for (sql, kind, id) in checks {
            if !self.exists(&mut *conn, sql, &id, doing).await? {
                return Err(Error::not_found(kind, id));
            }
        }
        Ok(())
    }

    /// Fails with `Conflict` when a run config of the launch was already launched for the
    /// same workflow and analysis, or appears twice in the launch.
    async fn check_duplicates(&self, conn: &mut SqliteConnection, launch: &NewRuns) -> Result<()> {
        let mut distinct: Vec<&str> = Vec::new();
        let mut seen = HashSet::new();
        for run in &launch.runs {
            if seen.insert(run.run_config.sha256.as_str()) {
                distinct.push(&run.run_config.sha256);
            }
        }
        let mut launched: HashMap<String, Id> = HashMap::new();
        for chunk in distinct.chunks(LOOKUP_CHUNK) {
            let sql = format!(
                "SELECT run_config_sha256, min(id) FROM runs \
                 WHERE workflow_id = ? AND analysis_id = ? AND run_config_sha256 IN ({}) \
                 GROUP BY run_config_sha256",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, (String, Id)>(AssertSqlSafe(sql))
                .persistent(chunk.len() == LOOKUP_CHUNK)
                .bind(launch.workflow_id)
                .bind(launch.analysis_id);
            for sha in chunk {
                query = query.bind(*sha);
            }
            let found = query
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| self.fail("look for run configs launched before", e))?;
            launched.extend(found);
        }

        let mut existing = Vec::new();
        let mut in_launch = Vec::new();
        let mut first: HashMap<&str, String> = HashMap::new();
        for (index, run) in launch.runs.iter().enumerate() {
            let source = source_label(run.source_file.as_deref(), index);
            let sha = run.run_config.sha256.as_str();
            if let Some(&id) = launched.get(sha) {
                existing.push((source, id));
            } else if let Some(earlier) = first.get(sha) {
                in_launch.push((source, earlier.clone()));
            } else {
                first.insert(sha, source);
            }
        }
        if !existing.is_empty() {
            return Err(Error::duplicate_runs(&existing));
        }
        if !in_launch.is_empty() {
            return Err(duplicates_in_launch(&in_launch));
        }
        Ok(())
    }

    /// The largest run id ever handed out; new runs take the ids after it.
    async fn last_run_id(&self, conn: &mut SqliteConnection) -> Result<Id> {
        sqlx::query_scalar::<_, Id>(
            "SELECT max(coalesce((SELECT max(id) FROM runs), 0), \
                        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'runs'), 0))",
        )
        .fetch_one(conn)
        .await
        .map_err(|e| self.fail("reserve run ids", e))
    }
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn create_workflow(&self, new: NewWorkflow) -> Result<Workflow> {
        let doing = format!("register workflow {} version {}", new.name, new.version);
        let definition = serde_json::to_string(&new.definition)
            .map_err(|e| Error::backend(format!("cannot {doing}: bad definition"), e))?;
        let now = now_ms();
        let mut tx = self.begin_write(&doing).await?;
        if let Some(existing) = workflow_id_by_name(&mut tx, &new.name, &new.version)
            .await
            .map_err(|e| self.fail(&doing, e))?
        {
            return Err(workflow_exists(&new.name, &new.version, existing));
        }
        insert_configs(&mut tx, &[&new.config], now)
            .await
            .map_err(|e| self.fail(&doing, e))?;
        let inserted = sqlx::query(
            "INSERT INTO workflows (name, version, definition, config_id, created_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&new.name)
        .bind(&new.version)
        .bind(definition)
        .bind(new.config.id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await;
        let id = match inserted {
            Ok(done) => done.last_insert_rowid(),
            Err(e) if is_kind(&e, ErrorKind::UniqueViolation) => {
                let existing = workflow_id_by_name(&mut tx, &new.name, &new.version)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                return Err(workflow_exists(&new.name, &new.version, existing));
            }
            Err(e) => return Err(self.fail(&doing, e)),
        };
        self.commit(tx, &doing).await?;
        Ok(Workflow {
            id,
            name: new.name,
            version: new.version,
            definition: new.definition,
            config_id: new.config.id,
            created_at: from_ms(now).map_err(|e| self.corrupt("the clock", e))?,
        })
    }

    async fn get_workflow(&self, id: Id) -> Result<Workflow> {
        let row = sqlx::query(
            "SELECT id, name, version, definition, config_id, created_at \
             FROM workflows WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.fail(&format!("read workflow {id}"), e))?
        .ok_or_else(|| Error::not_found(Kind::Workflow, id))?;
        workflow_from_row(&row).map_err(|e| self.corrupt(&format!("workflow {id}"), e))
    }

    async fn list_workflows(&self) -> Result<Vec<Workflow>> {
        let rows = sqlx::query(
            "SELECT id, name, version, definition, config_id, created_at \
             FROM workflows ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail("list workflows", e))?;
        rows.iter()
            .map(workflow_from_row)
            .collect::<Decoded<_>>()
            .map_err(|e| self.corrupt("a workflow", e))
    }

    async fn create_analysis(&self, new: NewAnalysis) -> Result<Analysis> {
        let doing = format!("create analysis {}", new.name);
        let now = now_ms();
        let mut tx = self.begin_write(&doing).await?;
        insert_configs(&mut tx, &[&new.config], now)
            .await
            .map_err(|e| self.fail(&doing, e))?;
        let id = sqlx::query(
            "INSERT INTO analyses (name, start_date, config_id, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&new.name)
        .bind(new.start_date.to_string())
        .bind(new.config.id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.fail(&doing, e))?
        .last_insert_rowid();
        self.commit(tx, &doing).await?;
        Ok(Analysis {
            id,
            name: new.name,
            start_date: new.start_date,
            config_id: new.config.id,
            created_at: from_ms(now).map_err(|e| self.corrupt("the clock", e))?,
        })
    }

    async fn get_analysis(&self, id: Id) -> Result<Analysis> {
        let row = sqlx::query(
            "SELECT id, name, start_date, config_id, created_at FROM analyses WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.fail(&format!("read analysis {id}"), e))?
        .ok_or_else(|| Error::not_found(Kind::Analysis, id))?;
        analysis_from_row(&row).map_err(|e| self.corrupt(&format!("analysis {id}"), e))
    }

    async fn list_analyses(&self) -> Result<Vec<Analysis>> {
        let rows = sqlx::query(
            "SELECT id, name, start_date, config_id, created_at FROM analyses ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail("list analyses", e))?;
        rows.iter()
            .map(analysis_from_row)
            .collect::<Decoded<_>>()
            .map_err(|e| self.corrupt("an analysis", e))
    }

    async fn set_config(&self, owner: ConfigOwner, config: Config) -> Result<()> {
        let (sql, kind, id) = match owner {
            ConfigOwner::Workflow(id) => (
                "UPDATE workflows SET config_id = ? WHERE id = ?",
                Kind::Workflow,
                id,
            ),
            ConfigOwner::Analysis(id) => (
                "UPDATE analyses SET config_id = ? WHERE id = ?",
                Kind::Analysis,
                id,
            ),
        };
        let doing = format!("update the config of {kind} {id}");
        let mut tx = self.begin_write(&doing).await?;
        insert_configs(&mut tx, &[&config], now_ms())
            .await
            .map_err(|e| self.fail(&doing, e))?;
        let updated = sqlx::query(sql)
            .bind(config.id.to_string())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.fail(&doing, e))?
            .rows_affected();
        if updated == 0 {
            // Dropping the transaction rolls back the config stored above.
            return Err(Error::not_found(kind, id));
        }
        self.commit(tx, &doing).await
    }

    async fn get_config(&self, id: Uuid) -> Result<Config> {
        let row = sqlx::query("SELECT data, sha256 FROM configs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("read config {id}"), e))?
            .ok_or_else(|| Error::not_found(Kind::Config, id))?;
        let decode = || -> Decoded<Config> {
            Ok(Config {
                id,
                data: serde_json::from_str(row.try_get::<&str, _>(0)?)?,
                sha256: row.try_get(1)?,
            })
        };
        decode().map_err(|e| self.corrupt(&format!("config {id}"), e))
    }

    async fn get_configs(&self, ids: &[Uuid]) -> Result<Vec<Config>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids_json = serde_json::to_string(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>())
            .map_err(|e| Error::backend("encode config ids", e))?;
        self.read(format!("read {} configs", ids.len()), move |conn, cx| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, data, sha256 FROM configs \
                     WHERE id IN (SELECT value FROM json_each(?))",
                )
                .map_err(|e| cx.fail(&e))?;
            let rows = statement.query([ids_json]).map_err(|e| cx.fail(&e))?;
            decode_all(rows, cx, "a config", |row| {
                Ok(Config {
                    id: text(row, 0)?.parse()?,
                    data: serde_json::from_str(text(row, 1)?)?,
                    sha256: row.get(2)?,
                })
            })
        })
        .await
    }

    async fn create_runs(&self, launch: NewRuns) -> Result<Vec<AnalysisRun>> {
        let doing = format!(
            "launch {} run(s) of workflow {} for analysis {}",
            launch.runs.len(),
            launch.workflow_id,
            launch.analysis_id
        );
        engine::check_task_ids(&launch.task_ids)?;
        let now = now_ms();
        let created_at = from_ms(now).map_err(|e| self.corrupt("the clock", e))?;
        let mut tx = self.begin_write(&doing).await?;
        self.check_references(&mut tx, &launch).await?;
        if !launch.allow_duplicates {
            self.check_duplicates(&mut tx, &launch).await?;
        }
        let first_id = self.last_run_id(&mut tx).await? + 1;

        let mut effective = Vec::with_capacity(launch.runs.len());
        for (offset, run) in (0..).zip(&launch.runs) {
            let data = config::effective_for_run(run.merged_config.clone(), first_id + offset);
            effective.push(Config {
                id: time_ordered_id(now),
                sha256: config::sha256(&data),
                data,
            });
        }
        let configs: Vec<&Config> = launch
            .runs
            .iter()
            .map(|r| &r.run_config)
            .chain(&effective)
            .collect();
        let inserted = async {
            insert_configs(&mut tx, &configs, now).await?;
            insert_runs(&mut tx, &launch, &effective, first_id, now).await?;
            engine::insert_tasks(&mut tx, first_id, launch.runs.len(), &launch.task_ids).await
        }
        .await;
        if let Err(e) = inserted {
            if is_kind(&e, ErrorKind::ForeignKeyViolation) {
                self.check_references(&mut tx, &launch).await?;
            }
            return Err(self.fail(&doing, e));
        }
        self.commit(tx, &doing).await?;
        self.writer.ready_runs.ring();

        let runs = (0..)
            .zip(launch.runs)
            .zip(effective)
            .map(|((offset, run), effective)| AnalysisRun {
                id: first_id + offset,
                workflow_id: launch.workflow_id,
                analysis_id: launch.analysis_id,
                status: RunStatus::Ready,
                workflow_config_id: launch.workflow_config_id,
                analysis_config_id: launch.analysis_config_id,
                run_config_id: run.run_config.id,
                effective_config_id: effective.id,
                source_file: run.source_file,
                error: None,
                created_at,
                started_at: None,
                ended_at: None,
            })
            .collect();
        Ok(runs)
    }

    async fn get_run(&self, id: Id) -> Result<AnalysisRun> {
        self.read(format!("read run {id}"), move |conn, cx| {
            let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?");
            let mut statement = conn.prepare_cached(&sql).map_err(|e| cx.fail(&e))?;
            let mut rows = statement.query([id]).map_err(|e| cx.fail(&e))?;
            let row = rows
                .next()
                .map_err(|e| cx.fail(&e))?
                .ok_or_else(|| Error::not_found(Kind::Run, id))?;
            run_from_row(row).map_err(|e| cx.corrupt(&format!("run {id}"), e))
        })
        .await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<AnalysisRun>> {
        if filter.limit == Some(0) {
            return Ok(Vec::new());
        }
        let mut conditions = Vec::new();
        if filter.workflow_id.is_some() {
            conditions.push("workflow_id = ?");
        }
        if filter.analysis_id.is_some() {
            conditions.push("analysis_id = ?");
        }
        if filter.status.is_some() {
            conditions.push("status = ?");
        }
        if filter.after_id.is_some() {
            conditions.push(if filter.newest_first {
                "id < ?"
            } else {
                "id > ?"
            });
        }
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs");
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(if filter.newest_first {
            " ORDER BY id DESC"
        } else {
            " ORDER BY id"
        });
        if filter.limit.is_some() {
            sql.push_str(" LIMIT ?");
        }
        // In the order of the conditions above.
        let values: Vec<Value> = [
            filter.workflow_id.map(Value::Integer),
            filter.analysis_id.map(Value::Integer),
            filter.status.map(|s| Value::Text(s.as_str().to_owned())),
            filter.after_id.map(Value::Integer),
            filter.limit.map(|n| Value::Integer(i64::from(n))),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.read("list runs".to_owned(), move |conn, cx| {
            let mut statement = conn.prepare_cached(&sql).map_err(|e| cx.fail(&e))?;
            let rows = statement
                .query(rusqlite::params_from_iter(values))
                .map_err(|e| cx.fail(&e))?;
            decode_all(rows, cx, "a run", run_from_row)
        })
        .await
    }

    async fn count_runs(&self, filter: &RunFilter) -> Result<BTreeMap<RunStatus, u64>> {
        let doing = "count runs";
        let mut conn = self.pool.acquire().await.map_err(|e| self.fail(doing, e))?;
        if let Some(id) = filter.workflow_id {
            let sql = "SELECT 1 FROM workflows WHERE id = ?";
            if !self.exists(&mut conn, sql, id, doing).await? {
                return Err(Error::not_found(Kind::Workflow, id));
            }
        }
        if let Some(id) = filter.analysis_id {
            let sql = "SELECT 1 FROM analyses WHERE id = ?";
            if !self.exists(&mut conn, sql, id, doing).await? {
                return Err(Error::not_found(Kind::Analysis, id));
            }
        }
        // `run_counts` holds the runs per workflow, analysis and status, kept by triggers
        // (migration 0006) and by the engine's writes (`store/engine/apply.rs`), so this sums
        // a few rows however many runs there are.
        let mut sql = "SELECT status, sum(n) FROM run_counts".to_owned();
        match (filter.workflow_id, filter.analysis_id) {
            (Some(_), Some(_)) => sql.push_str(" WHERE workflow_id = ? AND analysis_id = ?"),
            (Some(_), None) => sql.push_str(" WHERE workflow_id = ?"),
            (None, Some(_)) => sql.push_str(" WHERE analysis_id = ?"),
            (None, None) => {}
        }
        sql.push_str(" GROUP BY status HAVING sum(n) > 0");
        let mut query = sqlx::query_as::<_, (String, i64)>(AssertSqlSafe(sql));
        for id in [filter.workflow_id, filter.analysis_id]
            .into_iter()
            .flatten()
        {
            query = query.bind(id);
        }
        let rows = query
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.fail(doing, e))?;
        let mut counts = BTreeMap::new();
        for (status, count) in rows {
            let status: RunStatus = status
                .parse()
                .map_err(|e: Error| self.corrupt("a run's status", e.into()))?;
            counts.insert(status, u64::try_from(count).unwrap_or_default());
        }
        Ok(counts)
    }

    async fn count_active_tasks(&self) -> Result<BTreeMap<TaskState, u64>> {
        let rows = sqlx::query_as::<_, (String, i64)>(
            "SELECT tasks.state, count(*) FROM runs JOIN tasks ON tasks.run_id = runs.id \
             WHERE runs.status IN ('ready', 'scheduled', 'in-progress') GROUP BY tasks.state",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail("count the tasks of unfinished runs", e))?;
        let mut counts = BTreeMap::new();
        for (state, count) in rows {
            let state: TaskState = state
                .parse()
                .map_err(|e: Error| self.corrupt("a task's state", e.into()))?;
            counts.insert(state, u64::try_from(count).unwrap_or_default());
        }
        Ok(counts)
    }

    async fn apply(&self, sets: Vec<ChangeSet>) -> Result<Vec<bool>> {
        let readies = ReadyRunsBell::readies_runs(&sets);
        let applied = self.apply_sets(sets).await?;
        if readies {
            self.writer.ready_runs.ring();
        }
        Ok(applied)
    }

    async fn list_tasks(&self, run_ids: &[Id]) -> Result<Vec<TaskInstance>> {
        self.select_tasks(run_ids).await
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<TaskInstance>> {
        self.select_expired(now, limit).await
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        self.select_events(filter).await
    }

    async fn last_event_id(&self) -> Result<Id> {
        self.select_last_event_id().await
    }

    /// SQLite lets one transaction write at a time, in every process, and an event's id is
    /// taken inside its transaction.
    fn events_visible_in_id_order(&self) -> bool {
        true
    }

    fn ready_runs_signal(&self) -> Option<tokio::sync::watch::Receiver<()>> {
        self.writer.watch_other_processes();
        Some(self.writer.ready_runs.subscribe())
    }

    async fn heartbeat_worker(&self, worker: &WorkerInfo) -> Result<()> {
        sqlx::query(
            "INSERT INTO workers \
             (name, host, pid, queue, slots, running, version, started_at, heartbeat_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid, \
             queue = excluded.queue, slots = excluded.slots, running = excluded.running, \
             version = excluded.version, started_at = excluded.started_at, \
             heartbeat_at = excluded.heartbeat_at",
        )
        .bind(&worker.name)
        .bind(&worker.host)
        .bind(i64::from(worker.pid))
        .bind(&worker.queue)
        .bind(i64::from(worker.slots))
        .bind(i64::from(worker.running))
        .bind(&worker.version)
        .bind(worker.started_at.timestamp_millis())
        .bind(worker.heartbeat_at.timestamp_millis())
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail(&format!("record worker {}", worker.name), e))?;
        Ok(())
    }

    async fn forget_worker(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("remove worker {name}"), e))?;
        Ok(())
    }

    async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        let rows = sqlx::query(
            "SELECT name, host, pid, queue, slots, running, version, started_at, heartbeat_at \
             FROM workers ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail("list the workers", e))?;
        rows.iter()
            .map(worker_from_row)
            .collect::<Decoded<Vec<_>>>()
            .map_err(|e| self.corrupt("a worker", e))
    }

    async fn try_lead(&self, role: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        // One statement, so the check and the write are one step under SQLite's write lock:
        // the row is written only if the role is free, ended, or already this holder's.
        let done = sqlx::query(
            "INSERT INTO role_leases (role, holder, since, until) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (role) DO UPDATE SET \
             since = CASE WHEN role_leases.holder = excluded.holder \
                          THEN role_leases.since ELSE excluded.since END, \
             holder = excluded.holder, until = excluded.until \
             WHERE role_leases.holder = excluded.holder OR role_leases.until <= ?3",
        )
        .bind(role)
        .bind(holder)
        .bind(now)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail(&format!("take the {role} lease for {holder}"), e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn resign(&self, role: &str, holder: &str) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "UPDATE role_leases SET until = ?1 WHERE role = ?2 AND holder = ?3 AND until > ?1",
        )
        .bind(now)
        .bind(role)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail(&format!("end {holder}'s {role} lease"), e))?;
        Ok(())
    }

    async fn leader(&self, role: &str) -> Result<Option<RoleLease>> {
        let row = sqlx::query("SELECT role, holder, since, until FROM role_leases WHERE role = ?")
            .bind(role)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("read the {role} lease"), e))?;
        row.as_ref()
            .map(lease_from_row)
            .transpose()
            .map_err(|e| self.corrupt("a role lease", e))
    }

    async fn create_token(&self, token: NewToken) -> Result<ApiToken> {
        self.insert_token(token).await
    }

    async fn find_token(&self, hash: &str) -> Result<Option<ApiToken>> {
        self.select_token(hash).await
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        self.select_tokens().await
    }

    async fn delete_token(&self, name: &str) -> Result<()> {
        self.remove_token(name).await
    }
}

type Decoded<T> = std::result::Result<T, BoxError>;

/// Where a call on the writer's or the reader's connection runs and what it does, for its
/// errors.
#[derive(Debug, Clone, Copy)]
struct Context<'c> {
    /// The database, as named in messages.
    location: &'c str,
    /// The call, as named in messages.
    doing: &'c str,
}

impl Context<'_> {
    fn fail(&self, err: &rusqlite::Error) -> Error {
        sqlite_error(self.location, self.doing, err)
    }

    fn corrupt(&self, what: &str, source: BoxError) -> Error {
        corrupt(self.location, what, source)
    }
}

/// The error of `what` (a row) in the database `location` names, which cannot be decoded.
fn corrupt(location: &str, what: &str, source: BoxError) -> Error {
    Error::backend(
        format!(
            "{what} in {location} cannot be read; the database may have been changed by hand or \
             by a newer butler"
        ),
        source,
    )
}

/// Decodes each of `rows` with `decode`; a row it cannot read is `what`, corrupt.
fn decode_all<T>(
    mut rows: rusqlite::Rows<'_>,
    cx: Context<'_>,
    what: &str,
    decode: impl Fn(&rusqlite::Row<'_>) -> Decoded<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| cx.fail(&e))? {
        out.push(decode(row).map_err(|e| cx.corrupt(what, e))?);
    }
    Ok(out)
}

/// The text in column `index` of `row`, borrowed.
fn text<'r>(row: &'r rusqlite::Row<'_>, index: usize) -> Decoded<&'r str> {
    Ok(row.get_ref(index)?.as_str()?)
}

/// A random UUID that sorts after those made in earlier milliseconds (the layout of UUID v7).
///
/// Config ids are keys of a B-tree: random ids spread a launch's inserts over the whole index,
/// which makes each launch rewrite pages across the file once it holds millions of configs;
/// ids that grow with time keep them at the index's end.
fn time_ordered_id(now_ms: i64) -> Uuid {
    let random = Uuid::new_v4();
    let mut tail = [0u8; 10];
    tail.copy_from_slice(&random.as_bytes()[..10]);
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(now_ms).unwrap_or_default(), &tail)
        .into_uuid()
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn from_ms(ms: i64) -> Decoded<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| format!("timestamp {ms} ms is out of range").into())
}

fn opt_from_ms(ms: Option<i64>) -> Decoded<Option<DateTime<Utc>>> {
    ms.map(from_ms).transpose()
}

fn uuid_at(row: &SqliteRow, index: usize) -> Decoded<Uuid> {
    Ok(Uuid::parse_str(row.try_get::<&str, _>(index)?)?)
}

fn workflow_from_row(row: &SqliteRow) -> Decoded<Workflow> {
    let definition: Definition = serde_json::from_str(row.try_get::<&str, _>(3)?)?;
    Ok(Workflow {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        version: row.try_get(2)?,
        definition,
        config_id: uuid_at(row, 4)?,
        created_at: from_ms(row.try_get(5)?)?,
    })
}

fn analysis_from_row(row: &SqliteRow) -> Decoded<Analysis> {
    Ok(Analysis {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        start_date: row.try_get::<&str, _>(2)?.parse::<NaiveDate>()?,
        config_id: uuid_at(row, 3)?,
        created_at: from_ms(row.try_get(4)?)?,
    })
}

/// Reads a row selected with [`RUN_COLUMNS`].
fn run_from_row(row: &rusqlite::Row<'_>) -> Decoded<AnalysisRun> {
    let uuid = |index: usize| -> Decoded<Uuid> { Ok(Uuid::parse_str(text(row, index)?)?) };
    Ok(AnalysisRun {
        id: row.get(0)?,
        workflow_id: row.get(1)?,
        analysis_id: row.get(2)?,
        status: text(row, 3)?.parse()?,
        workflow_config_id: uuid(4)?,
        analysis_config_id: uuid(5)?,
        run_config_id: uuid(6)?,
        effective_config_id: uuid(7)?,
        source_file: row.get(8)?,
        error: row.get(9)?,
        created_at: from_ms(row.get(10)?)?,
        started_at: opt_from_ms(row.get(11)?)?,
        ended_at: opt_from_ms(row.get(12)?)?,
    })
}

fn worker_from_row(row: &SqliteRow) -> Decoded<WorkerInfo> {
    Ok(WorkerInfo {
        name: row.try_get(0)?,
        host: row.try_get(1)?,
        pid: u32::try_from(row.try_get::<i64, _>(2)?)?,
        queue: row.try_get(3)?,
        slots: u32::try_from(row.try_get::<i64, _>(4)?)?,
        running: u32::try_from(row.try_get::<i64, _>(5)?)?,
        version: row.try_get(6)?,
        started_at: from_ms(row.try_get(7)?)?,
        heartbeat_at: from_ms(row.try_get(8)?)?,
    })
}

fn lease_from_row(row: &SqliteRow) -> Decoded<RoleLease> {
    Ok(RoleLease {
        role: row.try_get(0)?,
        holder: row.try_get(1)?,
        since: from_ms(row.try_get(2)?)?,
        until: from_ms(row.try_get(3)?)?,
    })
}

async fn workflow_id_by_name(
    conn: &mut SqliteConnection,
    name: &str,
    version: &str,
) -> std::result::Result<Option<Id>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM workflows WHERE name = ? AND version = ?")
        .bind(name)
        .bind(version)
        .fetch_optional(conn)
        .await
}

fn workflow_exists(name: &str, version: &str, id: Id) -> Error {
    Error::AlreadyExists(format!(
        "workflow {name} version {version} already exists (id {id}); choose another version"
    ))
}

/// `?, ?, …` with `n` placeholders.
fn placeholders(n: usize) -> String {
    let mut out = String::with_capacity(n * 3);
    for i in 0..n {
        out.push_str(if i == 0 { "?" } else { ", ?" });
    }
    out
}

/// `INSERT … VALUES (…), (…)` with `rows` tuples of `columns` placeholders.
fn insert_sql(head: &str, columns: usize, rows: usize) -> String {
    let tuple = format!("({})", placeholders(columns));
    let mut sql = String::with_capacity(head.len() + 8 + rows * (tuple.len() + 2));
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&tuple);
    }
    sql
}

/// Stores configs; one already stored under the same id is kept as it is, since stored
/// configs never change.
async fn insert_configs(
    conn: &mut SqliteConnection,
    configs: &[&Config],
    now: i64,
) -> std::result::Result<(), sqlx::Error> {
    for chunk in configs.chunks(INSERT_CHUNK) {
        let sql = insert_sql(
            "INSERT OR IGNORE INTO configs (id, data, sha256, created_at)",
            4,
            chunk.len(),
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .persistent(chunk.len() == 1 || chunk.len() == INSERT_CHUNK);
        for config in chunk {
            query = query
                .bind(config.id.to_string())
                .bind(config.data.to_string())
                .bind(&config.sha256)
                .bind(now);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_runs(
    conn: &mut SqliteConnection,
    launch: &NewRuns,
    effective: &[Config],
    first_id: Id,
    now: i64,
) -> std::result::Result<(), sqlx::Error> {
    let workflow_config_id = launch.workflow_config_id.to_string();
    let analysis_config_id = launch.analysis_config_id.to_string();
    let rows: Vec<(Id, _)> = (first_id..)
        .zip(launch.runs.iter().zip(effective))
        .collect();
    for chunk in rows.chunks(INSERT_CHUNK) {
        let sql = insert_sql(
            "INSERT INTO runs (id, workflow_id, analysis_id, status, workflow_config_id, \
             analysis_config_id, run_config_id, effective_config_id, run_config_sha256, \
             source_file, created_at)",
            11,
            chunk.len(),
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(chunk.len() == INSERT_CHUNK);
        for (id, (run, effective)) in chunk {
            query = query
                .bind(*id)
                .bind(launch.workflow_id)
                .bind(launch.analysis_id)
                .bind(RunStatus::Ready.as_str())
                .bind(&workflow_config_id)
                .bind(&analysis_config_id)
                .bind(run.run_config.id.to_string())
                .bind(effective.id.to_string())
                .bind(&run.run_config.sha256)
                .bind(run.source_file.as_deref())
                .bind(now);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// How a run of a launch is named in messages: its file, or its position in the launch.
fn source_label(source_file: Option<&str>, index: usize) -> String {
    source_file.map_or_else(|| format!("run config #{}", index + 1), str::to_owned)
}

/// The [`Error::Conflict`] of a launch that holds the same run config twice.
fn duplicates_in_launch(pairs: &[(String, String)]) -> Error {
    const SHOWN: usize = 20;
    let mut lines: Vec<String> = pairs
        .iter()
        .take(SHOWN)
        .map(|(source, first)| format!("  {source} has the same run config as {first}"))
        .collect();
    if pairs.len() > SHOWN {
        lines.push(format!("  … and {} more", pairs.len() - SHOWN));
    }
    Error::Conflict(format!(
        "{} run config(s) of this launch repeat an earlier one of the same launch; no run was \
         created:\n{}\nRemove the repeated files, or pass --allow-duplicates to launch them all.",
        pairs.len(),
        lines.join("\n")
    ))
}

/// The database as named in messages.
fn describe(config: &SqliteConfig) -> String {
    if config.is_memory() {
        "the in-memory SQLite database".to_owned()
    } else {
        format!("the SQLite database {}", config.path.display())
    }
}

fn connect_options(config: &SqliteConfig) -> Result<SqliteConnectOptions> {
    let options = if config.is_memory() {
        // A fresh name per store: an in-memory database that only this store's connections
        // see. The `memdb` VFS lets the pool and the writer share it with the locking of a
        // file, where the shared cache would refuse a reader at once while the writer writes.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "/butler-memory-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        SqliteConnectOptions::new()
            .filename(name)
            .vfs("memdb")
            .create_if_missing(true)
    } else {
        SqliteConnectOptions::new()
            .filename(&config.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
    };
    Ok(options
        .foreign_keys(true)
        .busy_timeout(config.busy_timeout())
        .synchronous(match config.durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        }))
}

fn is_kind(err: &sqlx::Error, kind: ErrorKind) -> bool {
    err.as_database_error().is_some_and(|db| db.kind() == kind)
}

/// Whether SQLite answered `SQLITE_BUSY` or `SQLITE_LOCKED`: another connection holds a lock.
fn is_busy(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db| db.code())
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// Whether SQLite's result code says the database is busy, locked or unreachable: states that
/// pass, where trying again can succeed.
fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
            // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
            matches!(code & 0xff, 5 | 6 | 10 | 13 | 14)
        }
        _ => false,
    }
}

fn map_error(location: &str, doing: &str, err: sqlx::Error) -> Error {
    if is_transient(&err) {
        Error::unavailable(
            format!(
                "cannot {doing}: {location} is busy or unreachable; try again, and check that \
                 its disk has room and the file is readable and writable"
            ),
            err,
        )
    } else {
        Error::backend(format!("cannot {doing} in {location}"), err)
    }
}

fn open_error(location: &str, err: sqlx::Error) -> Error {
    Error::unavailable(
        format!(
            "cannot open {location}; check that the path is right and its directory is writable"
        ),
        err,
    )
}

/// Applies the migrations the database lacks.
async fn migrate(pool: &SqlitePool, location: &str) -> Result<()> {
    // Processes opening a new file at the same moment each try to apply the first migrations;
    // the losers fail on tables the winner just created, and find them applied on a retry.
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match MIGRATOR.run(pool).await {
            Ok(()) => return Ok(()),
            Err(MigrateError::ExecuteMigration(..) | MigrateError::Execute(_))
                if attempt < ATTEMPTS =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(migrate_error(location, e)),
        }
    }
}

fn migrate_error(location: &str, err: MigrateError) -> Error {
    match err {
        MigrateError::VersionMissing(version) => Error::NotSupported(format!(
            "{location} was set up by a newer butler (it has migration {version}, which this \
             build does not know); upgrade butler, or use another database"
        )),
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) if is_transient(&e) => {
            map_error(location, "apply the database migrations", e)
        }
        other => Error::backend(
            format!("cannot apply the database migrations to {location}"),
            other,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_sql_repeats_one_tuple_per_row() {
        assert_eq!(
            insert_sql("INSERT INTO t (a, b)", 2, 3),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?)"
        );
        assert_eq!(placeholders(1), "?");
    }

    #[test]
    fn time_ordered_ids_sort_by_time_as_text() {
        let earlier = time_ordered_id(1_700_000_000_000).to_string();
        let later = time_ordered_id(1_700_000_000_001).to_string();
        assert!(earlier < later, "{earlier} < {later}");
        assert_ne!(time_ordered_id(5), time_ordered_id(5));
    }

    #[test]
    fn labels_runs_by_file_or_position() {
        assert_eq!(source_label(Some("s1.json"), 0), "s1.json");
        assert_eq!(source_label(None, 2), "run config #3");
    }
}
