//! PostgreSQL run store.

mod engine;
mod tokens;
mod workers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

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
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use super::config::{PgConfig, redact};
use super::listen::Listening;

/// SQL: the channel on which a launch or a reset announces that runs became `ready`, per
/// schema. A channel name is at most 63 bytes; a longer schema name is replaced by its MD5.
macro_rules! ready_runs_channel {
    () => {
        "(CASE WHEN octet_length(current_schema()) <= 50 \
              THEN 'butler_runs_' || current_schema() \
              ELSE 'butler_runs_' || md5(current_schema()) END)"
    };
}

/// Tells other processes' schedulers, when `tx` commits, that runs became `ready`.
async fn announce_ready_runs(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(concat!("SELECT pg_notify(", ready_runs_channel!(), ", '')"))
        .execute(tx)
        .await
        .map(drop)
}

/// The migrations of the tracker, the engine and the queue, applied by [`PgStore::open`].
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The columns of `runs` in the order [`run_from_row`] reads them.
const RUN_COLUMNS: &str = "id, workflow_id, analysis_id, status, workflow_config_id::text, \
                           analysis_config_id::text, run_config_id::text, \
                           effective_config_id::text, source_file, error, created_at, \
                           started_at, ended_at";

/// Stores configs given as arrays of ids, JSON texts and hashes, all at time `$4`; one already
/// stored under the same id is kept as it is, since stored configs never change.
const INSERT_CONFIGS: &str = "INSERT INTO configs (id, data, sha256, created_at) \
                              SELECT c.id::uuid, c.data::json, c.sha256, $4 \
                              FROM unnest($1::text[], $2::text[], $3::text[]) \
                              AS c (id, data, sha256) \
                              ON CONFLICT (id) DO NOTHING";

/// Creates the runs of a launch with the ids from `$1` on: workflow `$2`, analysis `$3`, their
/// config layers `$4` and `$5`, created at `$6`, then one array element per run of its own
/// config id, effective config id, run config hash and source file.
const INSERT_RUNS: &str = "INSERT INTO runs (id, workflow_id, analysis_id, workflow_config_id, \
                           analysis_config_id, run_config_id, effective_config_id, \
                           run_config_sha256, source_file, created_at) \
                           SELECT $1 + r.n - 1, $2, $3, $4::uuid, $5::uuid, \
                           r.run_config_id::uuid, r.effective_config_id::uuid, r.sha256, \
                           r.source_file, $6 \
                           FROM unnest($7::text[], $8::text[], $9::text[], $10::text[]) \
                           WITH ORDINALITY AS r (run_config_id, effective_config_id, sha256, \
                           source_file, n)";

/// Butler's run store in a schema of a PostgreSQL database, for trackers that outgrow one
/// machine.
///
/// Cloning is cheap and shares the connection pool. Any number of stores, in this process or
/// on other machines, may open the same schema: every write is one transaction, compare-and-set
/// changes lock the rows they read, and launches take a lock of their own, so concurrent
/// launches neither share run ids nor both launch the same run config.
///
/// Event ids come from a sequence: they never repeat, but a transaction that took its ids first
/// may commit after one that took later ids, so for a moment a reader may see an event with a
/// larger id before one with a smaller. Readers following the log by id (the scheduler) look
/// back over a window of recent ids.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    config: Arc<PgConfig>,
    /// The database as named in messages: host, port, database and schema, never the password.
    location: Arc<str>,
    /// Rung when runs became `ready` through this store or its clones, or, once a scheduler
    /// asked for the signal, through another process (a notification on `butler_runs_SCHEMA`).
    ready_runs: Arc<ReadyRunsBell>,
    /// The listener on `butler_runs_SCHEMA`, started by the first
    /// [`RunStore::ready_runs_signal`]; stopped when the last clone is dropped.
    ready_runs_listener: Arc<tokio::sync::Mutex<Option<Listening>>>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location)
            .field("durability", &self.config.durability)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the server `config` names, creates the schema if it is missing and applies
    /// the migrations it lacks. Every connection of the pool then works in that schema, with
    /// the durability `config` asks for.
    ///
    /// Fails with `Unavailable`, naming the host and database but never the password, when the
    /// server cannot be reached or refuses the connection.
    pub async fn open(config: &PgConfig) -> Result<Self> {
        let options = config.connect_options()?;
        let location: Arc<str> = describe(config, &options).into();
        let session: Arc<str> = session_sql(config).into();

        let mut conn = connect_once(config, &options, &location).await?;
        let created = create_schema(&mut conn, config, &session, &location).await;
        // The pool opens its own connections; this one only made sure the schema exists.
        let _ = conn.close().await;
        created?;

        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.connect_timeout())
            .after_connect(move |conn, _| {
                let session = session.clone();
                Box::pin(async move {
                    sqlx::raw_sql(AssertSqlSafe(session)).execute(conn).await?;
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| migrate_error(&location, e))?;
        Ok(PgStore {
            pool,
            config: Arc::new(config.clone()),
            location,
            ready_runs: Arc::default(),
            ready_runs_listener: Arc::default(),
        })
    }

    /// The `application_name` of the connection that listens for runs other processes
    /// launched, which tells it apart in `pg_stat_activity`.
    pub const READY_RUNS_LISTENER_APPLICATION_NAME: &str = "butler launch listener";

    /// Starts listening on `butler_runs_SCHEMA` unless a listener runs, in the background:
    /// the scheduler asking does not wait, and finds runs launched before the listener
    /// listens at its next poll.
    fn listen_for_ready_runs(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, slot, bell) = (
            self.pool.clone(),
            Arc::clone(&self.ready_runs_listener),
            Arc::clone(&self.ready_runs),
        );
        runtime.spawn(async move {
            let mut slot = slot.lock().await;
            if slot.as_ref().is_some_and(Listening::is_running) {
                return;
            }
            let started = async {
                let channel: String = sqlx::query_scalar(concat!("SELECT ", ready_runs_channel!()))
                    .fetch_one(&pool)
                    .await
                    .map_err(|e| {
                        Error::unavailable("cannot read the launch notification channel", e)
                    })?;
                // Any notification, or a gap in them, may mean new runs: the scheduler looks.
                Listening::start(
                    &pool,
                    &channel,
                    Self::READY_RUNS_LISTENER_APPLICATION_NAME,
                    "launches",
                    move |_| bell.ring(),
                )
                .await
            };
            match started.await {
                Ok(listening) => *slot = Some(listening),
                Err(error) => tracing::warn!(
                    %error,
                    "runs launched by other processes are taken at the scheduler's next poll"
                ),
            }
        });
    }

    /// Opens the schema named by a `postgres://` or `postgresql://` URL (see
    /// [`PgConfig::from_url`]).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(&PgConfig::from_url(url)?).await
    }

    /// The connection pool, for other tables living in the same schema (the queue). Its
    /// connections have the schema first on their `search_path`.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding the store's tables.
    pub fn schema(&self) -> &str {
        &self.config.schema
    }

    /// The settings the store was opened with.
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// Closes every connection, waiting for those in use to be returned; later calls fail as
    /// unavailable.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Maps a failure while `doing` something to Butler's error, naming the database.
    fn fail(&self, doing: &str, err: sqlx::Error) -> Error {
        map_error(&self.location, doing, err)
    }

    async fn begin(&self, doing: &str) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.pool.begin().await.map_err(|e| self.fail(doing, e))
    }

    async fn commit(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        doing: &str,
    ) -> Result<()> {
        tx.commit().await.map_err(|e| self.fail(doing, e))?;
        metrics::counter!(STORE_COMMITS).increment(1);
        Ok(())
    }

    fn corrupt(&self, what: &str, source: BoxError) -> Error {
        Error::backend(
            format!(
                "{what} in {} cannot be read; the database may have been changed by hand or \
                 by a newer butler",
                self.location
            ),
            source,
        )
    }

    /// Fails with `NotFound` when the launch names a workflow, analysis or config layer that
    /// does not exist.
    async fn check_references(&self, conn: &mut PgConnection, launch: &NewRuns) -> Result<()> {
        let (workflow, analysis, workflow_config, analysis_config) =
            sqlx::query_as::<_, (bool, bool, bool, bool)>(
                "SELECT EXISTS (SELECT 1 FROM workflows WHERE id = $1), \
                 EXISTS (SELECT 1 FROM analyses WHERE id = $2), \
                 EXISTS (SELECT 1 FROM configs WHERE id = $3::uuid), \
                 EXISTS (SELECT 1 FROM configs WHERE id = $4::uuid)",
            )
            .bind(launch.workflow_id)
            .bind(launch.analysis_id)
            .bind(launch.workflow_config_id.to_string())
            .bind(launch.analysis_config_id.to_string())
            .fetch_one(conn)
            .await
            .map_err(|e| self.fail("check the launch's workflow and analysis", e))?;
        if !workflow {
            return Err(Error::not_found(Kind::Workflow, launch.workflow_id));
        }
        if !analysis {
            return Err(Error::not_found(Kind::Analysis, launch.analysis_id));
        }
        if !workflow_config {
            return Err(Error::not_found(Kind::Config, launch.workflow_config_id));
        }
        if !analysis_config {
            return Err(Error::not_found(Kind::Config, launch.analysis_config_id));
        }
        Ok(())
    }

    /// Fails with `Conflict` when a run config of the launch was already launched for the
    /// same workflow and analysis, or appears twice in the launch.
    async fn check_duplicates(&self, conn: &mut PgConnection, launch: &NewRuns) -> Result<()> {
        let mut distinct: Vec<&str> = Vec::new();
        let mut seen = HashSet::new();
        for run in &launch.runs {
            if seen.insert(run.run_config.sha256.as_str()) {
                distinct.push(&run.run_config.sha256);
            }
        }
        let launched: HashMap<String, Id> = sqlx::query_as::<_, (String, Id)>(
            "SELECT run_config_sha256, min(id) FROM runs \
             WHERE workflow_id = $1 AND analysis_id = $2 AND run_config_sha256 = ANY($3) \
             GROUP BY run_config_sha256",
        )
        .bind(launch.workflow_id)
        .bind(launch.analysis_id)
        .bind(&distinct)
        .fetch_all(conn)
        .await
        .map_err(|e| self.fail("look for run configs launched before", e))?
        .into_iter()
        .collect();

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

    /// Takes `runs` consecutive ids from the runs' sequence; answers the first. The caller
    /// holds the launch lock, which keeps another launch from taking ids in between.
    async fn reserve_run_ids(&self, conn: &mut PgConnection, runs: usize) -> Result<Id> {
        let count = Id::try_from(runs).map_err(|e| {
            Error::backend(format!("cannot reserve ids for {runs} runs"), e.to_string())
        })?;
        let last: Id = sqlx::query_scalar(
            "SELECT setval(pg_get_serial_sequence('runs', 'id'), \
             nextval(pg_get_serial_sequence('runs', 'id')) + $1 - 1)",
        )
        .bind(count)
        .fetch_one(conn)
        .await
        .map_err(|e| self.fail("reserve run ids", e))?;
        Ok(last - count + 1)
    }
}

#[async_trait]
impl RunStore for PgStore {
    async fn create_workflow(&self, new: NewWorkflow) -> Result<Workflow> {
        let doing = format!("register workflow {} version {}", new.name, new.version);
        let definition = serde_json::to_string(&new.definition)
            .map_err(|e| Error::backend(format!("cannot {doing}: bad definition"), e))?;
        let now = now_ms();
        let created_at = from_ms(now).map_err(|e| self.corrupt("the clock", e))?;
        let mut tx = self.begin(&doing).await?;
        insert_configs(&mut tx, &[&new.config], now)
            .await
            .map_err(|e| self.fail(&doing, e))?;
        // A workflow of the same name and version, committed or being committed by another
        // transaction, makes the insert do nothing rather than fail the transaction.
        let inserted: Option<Id> = sqlx::query_scalar(
            "INSERT INTO workflows (name, version, definition, config_id, created_at) \
             VALUES ($1, $2, $3::json, $4::uuid, $5) \
             ON CONFLICT (name, version) DO NOTHING RETURNING id",
        )
        .bind(&new.name)
        .bind(&new.version)
        .bind(definition)
        .bind(new.config.id.to_string())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.fail(&doing, e))?;
        let Some(id) = inserted else {
            let existing: Option<Id> =
                sqlx::query_scalar("SELECT id FROM workflows WHERE name = $1 AND version = $2")
                    .bind(&new.name)
                    .bind(&new.version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| self.fail(&doing, e))?;
            // Dropping the transaction rolls back the config stored above.
            return Err(workflow_exists(
                &new.name,
                &new.version,
                existing.unwrap_or_default(),
            ));
        };
        self.commit(tx, &doing).await?;
        Ok(Workflow {
            id,
            name: new.name,
            version: new.version,
            definition: new.definition,
            config_id: new.config.id,
            created_at,
        })
    }

    async fn get_workflow(&self, id: Id) -> Result<Workflow> {
        let row = sqlx::query(
            "SELECT id, name, version, definition::text, config_id::text, created_at \
             FROM workflows WHERE id = $1",
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
            "SELECT id, name, version, definition::text, config_id::text, created_at \
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
        let created_at = from_ms(now).map_err(|e| self.corrupt("the clock", e))?;
        let mut tx = self.begin(&doing).await?;
        insert_configs(&mut tx, &[&new.config], now)
            .await
            .map_err(|e| self.fail(&doing, e))?;
        let id: Id = sqlx::query_scalar(
            "INSERT INTO analyses (name, start_date, config_id, created_at) \
             VALUES ($1, $2::date, $3::uuid, $4) RETURNING id",
        )
        .bind(&new.name)
        .bind(new.start_date.to_string())
        .bind(new.config.id.to_string())
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.fail(&doing, e))?;
        self.commit(tx, &doing).await?;
        Ok(Analysis {
            id,
            name: new.name,
            start_date: new.start_date,
            config_id: new.config.id,
            created_at,
        })
    }

    async fn get_analysis(&self, id: Id) -> Result<Analysis> {
        let row = sqlx::query(
            "SELECT id, name, start_date::text, config_id::text, created_at \
             FROM analyses WHERE id = $1",
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
            "SELECT id, name, start_date::text, config_id::text, created_at \
             FROM analyses ORDER BY id",
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
                "UPDATE workflows SET config_id = $1::uuid WHERE id = $2",
                Kind::Workflow,
                id,
            ),
            ConfigOwner::Analysis(id) => (
                "UPDATE analyses SET config_id = $1::uuid WHERE id = $2",
                Kind::Analysis,
                id,
            ),
        };
        let doing = format!("update the config of {kind} {id}");
        let mut tx = self.begin(&doing).await?;
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
        let row = sqlx::query("SELECT data::text, sha256 FROM configs WHERE id = $1::uuid")
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
        let texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let rows = sqlx::query(
            "SELECT id::text, data::text, sha256 FROM configs WHERE id = ANY($1::text[]::uuid[])",
        )
        .bind(texts)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail(&format!("read {} configs", ids.len()), e))?;
        rows.iter()
            .map(|row| {
                let decode = || -> Decoded<Config> {
                    Ok(Config {
                        id: row.try_get::<&str, _>(0)?.parse()?,
                        data: serde_json::from_str(row.try_get::<&str, _>(1)?)?,
                        sha256: row.try_get(2)?,
                    })
                };
                decode().map_err(|e| self.corrupt("a config", e))
            })
            .collect()
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
        let mut tx = self.begin(&doing).await?;
        // One launch at a time per schema, as in the SQLite store: the duplicate check sees
        // every earlier launch, and each launch's ids are consecutive.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(\
             hashtextextended('butler launch ' || current_schema(), 0))",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.fail(&doing, e))?;
        self.check_references(&mut tx, &launch).await?;
        if !launch.allow_duplicates {
            self.check_duplicates(&mut tx, &launch).await?;
        }
        if launch.runs.is_empty() {
            self.commit(tx, &doing).await?;
            return Ok(Vec::new());
        }
        let first_id = self.reserve_run_ids(&mut tx, launch.runs.len()).await?;

        let mut effective = Vec::with_capacity(launch.runs.len());
        for (offset, run) in (0..).zip(&launch.runs) {
            let data = config::effective_for_run(run.merged_config.clone(), first_id + offset);
            effective.push(Config {
                // Ids that grow with time keep a launch's inserts at the end of the index.
                id: Uuid::now_v7(),
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
            return Err(self.fail(&doing, e));
        }
        announce_ready_runs(&mut tx)
            .await
            .map_err(|e| self.fail(&doing, e))?;
        self.commit(tx, &doing).await?;
        self.ready_runs.ring();

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
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("read run {id}"), e))?
            .ok_or_else(|| Error::not_found(Kind::Run, id))?;
        run_from_row(&row).map_err(|e| self.corrupt(&format!("run {id}"), e))
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<AnalysisRun>> {
        if filter.limit == Some(0) {
            return Ok(Vec::new());
        }
        let mut conditions = Vec::new();
        let mut next = 0;
        let mut placeholder = || {
            next += 1;
            format!("${next}")
        };
        if filter.workflow_id.is_some() {
            conditions.push(format!("workflow_id = {}", placeholder()));
        }
        if filter.analysis_id.is_some() {
            conditions.push(format!("analysis_id = {}", placeholder()));
        }
        if filter.status.is_some() {
            conditions.push(format!("status = {}", placeholder()));
        }
        if filter.after_id.is_some() {
            let op = if filter.newest_first { "<" } else { ">" };
            conditions.push(format!("id {op} {}", placeholder()));
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
            sql.push_str(" LIMIT ");
            sql.push_str(&placeholder());
        }
        let mut query = sqlx::query(AssertSqlSafe(sql));
        if let Some(id) = filter.workflow_id {
            query = query.bind(id);
        }
        if let Some(id) = filter.analysis_id {
            query = query.bind(id);
        }
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(id) = filter.after_id {
            query = query.bind(id);
        }
        if let Some(limit) = filter.limit {
            query = query.bind(i64::from(limit));
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("list runs", e))?;
        rows.iter()
            .map(run_from_row)
            .collect::<Decoded<_>>()
            .map_err(|e| self.corrupt("a run", e))
    }

    async fn count_runs(&self, filter: &RunFilter) -> Result<BTreeMap<RunStatus, u64>> {
        let doing = "count runs";
        // The named workflow's and analysis's own rows come first, with a NULL status and
        // their kind as the count, so one statement tells a missing owner from one without
        // runs. Triggers keep `run_counts` per workflow, analysis and status (migration
        // 0006), so the counts sum a few rows however many runs there are.
        let rows = sqlx::query_as::<_, (Option<String>, i64)>(
            "SELECT NULL::text, 1::bigint FROM workflows WHERE id = $1 \
             UNION ALL \
             SELECT NULL::text, 2::bigint FROM analyses WHERE id = $2 \
             UNION ALL \
             SELECT status, sum(n)::bigint FROM run_counts \
             WHERE ($1::bigint IS NULL OR workflow_id = $1) \
               AND ($2::bigint IS NULL OR analysis_id = $2) \
             GROUP BY status HAVING sum(n) > 0",
        )
        .bind(filter.workflow_id)
        .bind(filter.analysis_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail(doing, e))?;
        let found = |kind| {
            rows.iter()
                .any(|(status, n)| status.is_none() && *n == kind)
        };
        if let Some(id) = filter.workflow_id.filter(|_| !found(1)) {
            return Err(Error::not_found(Kind::Workflow, id));
        }
        if let Some(id) = filter.analysis_id.filter(|_| !found(2)) {
            return Err(Error::not_found(Kind::Analysis, id));
        }
        let mut counts = BTreeMap::new();
        for (status, count) in rows {
            let Some(status) = status else { continue };
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
        let applied = self.apply_sets(sets, readies).await?;
        if readies {
            self.ready_runs.ring();
        }
        Ok(applied)
    }

    fn ready_runs_signal(&self) -> Option<tokio::sync::watch::Receiver<()>> {
        let signal = self.ready_runs.subscribe();
        self.listen_for_ready_runs();
        Some(signal)
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

    async fn heartbeat_worker(&self, worker: &WorkerInfo) -> Result<()> {
        self.upsert_worker(worker).await
    }

    async fn forget_worker(&self, name: &str) -> Result<()> {
        self.delete_worker(name).await
    }

    async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        self.select_workers().await
    }

    async fn try_lead(&self, role: &str, holder: &str, ttl: Duration) -> Result<bool> {
        self.take_lease(role, holder, ttl).await
    }

    async fn resign(&self, role: &str, holder: &str) -> Result<()> {
        self.end_lease(role, holder).await
    }

    async fn leader(&self, role: &str) -> Result<Option<RoleLease>> {
        self.select_lease(role).await
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

fn uuid_at(row: &PgRow, index: usize) -> Decoded<Uuid> {
    Ok(Uuid::parse_str(row.try_get::<&str, _>(index)?)?)
}

fn workflow_from_row(row: &PgRow) -> Decoded<Workflow> {
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

fn analysis_from_row(row: &PgRow) -> Decoded<Analysis> {
    Ok(Analysis {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        start_date: row.try_get::<&str, _>(2)?.parse::<NaiveDate>()?,
        config_id: uuid_at(row, 3)?,
        created_at: from_ms(row.try_get(4)?)?,
    })
}

/// Reads a row selected with [`RUN_COLUMNS`].
fn run_from_row(row: &PgRow) -> Decoded<AnalysisRun> {
    Ok(AnalysisRun {
        id: row.try_get(0)?,
        workflow_id: row.try_get(1)?,
        analysis_id: row.try_get(2)?,
        status: row.try_get::<&str, _>(3)?.parse()?,
        workflow_config_id: uuid_at(row, 4)?,
        analysis_config_id: uuid_at(row, 5)?,
        run_config_id: uuid_at(row, 6)?,
        effective_config_id: uuid_at(row, 7)?,
        source_file: row.try_get(8)?,
        error: row.try_get(9)?,
        created_at: from_ms(row.try_get(10)?)?,
        started_at: opt_from_ms(row.try_get(11)?)?,
        ended_at: opt_from_ms(row.try_get(12)?)?,
    })
}

fn workflow_exists(name: &str, version: &str, id: Id) -> Error {
    Error::AlreadyExists(format!(
        "workflow {name} version {version} already exists (id {id}); choose another version"
    ))
}

/// Stores configs in one statement.
async fn insert_configs(
    conn: &mut PgConnection,
    configs: &[&Config],
    now: i64,
) -> std::result::Result<(), sqlx::Error> {
    let ids: Vec<String> = configs.iter().map(|c| c.id.to_string()).collect();
    let data: Vec<String> = configs.iter().map(|c| c.data.to_string()).collect();
    let hashes: Vec<&str> = configs.iter().map(|c| c.sha256.as_str()).collect();
    sqlx::query(INSERT_CONFIGS)
        .bind(ids)
        .bind(data)
        .bind(hashes)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(())
}

/// Creates the runs of a launch in one statement, with ids from `first_id` on.
async fn insert_runs(
    conn: &mut PgConnection,
    launch: &NewRuns,
    effective: &[Config],
    first_id: Id,
    now: i64,
) -> std::result::Result<(), sqlx::Error> {
    let run_configs: Vec<String> = launch
        .runs
        .iter()
        .map(|r| r.run_config.id.to_string())
        .collect();
    let effective: Vec<String> = effective.iter().map(|c| c.id.to_string()).collect();
    let hashes: Vec<&str> = launch
        .runs
        .iter()
        .map(|r| r.run_config.sha256.as_str())
        .collect();
    let sources: Vec<Option<&str>> = launch
        .runs
        .iter()
        .map(|r| r.source_file.as_deref())
        .collect();
    sqlx::query(INSERT_RUNS)
        .bind(first_id)
        .bind(launch.workflow_id)
        .bind(launch.analysis_id)
        .bind(launch.workflow_config_id.to_string())
        .bind(launch.analysis_config_id.to_string())
        .bind(now)
        .bind(run_configs)
        .bind(effective)
        .bind(hashes)
        .bind(sources)
        .execute(conn)
        .await?;
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

/// The database as named in messages, without the password.
fn describe(config: &PgConfig, options: &PgConnectOptions) -> String {
    let database = options
        .get_database()
        .unwrap_or_else(|| options.get_username());
    let server = match options.get_socket() {
        Some(socket) => format!("the socket {}", socket.display()),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    format!(
        "the PostgreSQL database `{database}` at {server} (schema `{}`)",
        config.schema
    )
}

/// The statements every new connection runs: the schema first on the search path, and the
/// durability of its commits.
fn session_sql(config: &PgConfig) -> String {
    // The schema name was checked to need no quoting; quoting it anyway keeps it exact.
    format!(
        "SET search_path TO \"{}\"; SET synchronous_commit TO {}",
        config.schema,
        config.durability.synchronous_commit()
    )
}

/// Opens one connection, failing as unavailable at once when the server refuses it and after
/// the connect timeout when it does not answer.
async fn connect_once(
    config: &PgConfig,
    options: &PgConnectOptions,
    location: &str,
) -> Result<PgConnection> {
    match tokio::time::timeout(config.connect_timeout(), options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(open_error(location, e)),
        Err(elapsed) => Err(Error::unavailable(
            format!(
                "cannot open {location}: no answer within {} ms; check that the server is \
                 running and reachable from here, or raise connect_timeout_ms",
                config.connect_timeout_ms
            ),
            elapsed,
        )),
    }
}

/// Creates the schema if it is missing, on `conn`.
async fn create_schema(
    conn: &mut PgConnection,
    config: &PgConfig,
    session: &str,
    location: &str,
) -> Result<()> {
    let doing = "prepare the schema";
    sqlx::raw_sql(AssertSqlSafe(session.to_owned()))
        .execute(&mut *conn)
        .await
        .map_err(|e| map_error(location, doing, e))?;
    // Looking first spares a user without the right to create schemas from needing it once
    // the schema exists; a store opening the same new schema at the same moment may create it
    // in between, which the second attempt sees.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(&config.schema)
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| map_error(location, doing, e))?;
        if exists {
            return Ok(());
        }
        let created = sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            config.schema
        )))
        .execute(&mut *conn)
        .await;
        match created {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 3 && matches!(sqlstate(&e), Some("23505" | "42P06")) => {}
            Err(e) => {
                return Err(map_error(
                    location,
                    &format!(
                        "create the schema `{}` (or create it by hand and grant this user \
                         the right to use it)",
                        config.schema
                    ),
                    e,
                ));
            }
        }
    }
}

/// The SQLSTATE code of a database error.
fn sqlstate(err: &sqlx::Error) -> Option<&str> {
    err.as_database_error()
        .and_then(|db| db.try_downcast_ref::<PgDatabaseError>())
        .map(PgDatabaseError::code)
}

/// Whether the failure passes by itself: the server is unreachable, restarting, overloaded or
/// out of room, or the transaction lost a race that trying again wins.
fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate(err).is_some_and(|code| {
            // Connection exceptions, insufficient resources, operator intervention (shutdown,
            // cancel), system errors, serialization failures and deadlocks, lock timeouts.
            ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
                || matches!(code, "40001" | "40P01" | "55P03")
        }),
        _ => false,
    }
}

fn map_error(location: &str, doing: &str, err: sqlx::Error) -> Error {
    if is_transient(&err) {
        return Error::unavailable(
            format!(
                "cannot {doing}: {location} is unreachable or busy; check that the server is \
                 running and reachable, then try again"
            ),
            err,
        );
    }
    let db = err
        .as_database_error()
        .and_then(|db| db.try_downcast_ref::<PgDatabaseError>());
    match db.map(|db| (db.code(), db.detail(), db.table())) {
        Some(("23505", detail, _)) => Error::AlreadyExists(format!(
            "cannot {doing}: it already exists in {location} ({}); choose another name",
            detail.unwrap_or("a unique key is taken")
        )),
        Some(("23503", Some(detail), Some(_))) => match missing_reference(detail) {
            Some((kind, id)) => Error::not_found(kind, id),
            None => Error::backend(format!("cannot {doing} in {location}"), err),
        },
        Some(("22021" | "22P05", _, _)) => Error::InvalidInput(format!(
            "cannot {doing}: a text holds a NUL character (\\u0000), which PostgreSQL cannot \
             store; remove it and try again"
        )),
        _ => Error::backend(format!("cannot {doing} in {location}"), err),
    }
}

/// What a foreign-key failure's detail, `Key (workflow_id)=(7) is not present in table
/// "workflows".`, names as missing.
fn missing_reference(detail: &str) -> Option<(Kind, String)> {
    let (_, rest) = detail.split_once(")=(")?;
    let (id, rest) = rest.split_once(')')?;
    let table = rest.split('"').nth(1)?;
    let kind = match table {
        "workflows" => Kind::Workflow,
        "analyses" => Kind::Analysis,
        "runs" => Kind::Run,
        "configs" => Kind::Config,
        "tasks" => Kind::Task,
        _ => return None,
    };
    Some((kind, id.to_owned()))
}

fn open_error(location: &str, err: sqlx::Error) -> Error {
    let hint = match sqlstate(&err) {
        Some("3D000") => "the database does not exist; create it (createdb) or fix the URL",
        Some("28P01" | "28000") => "the server refused the user or password; fix the URL",
        _ => "check that the server is running, reachable from here, and that the URL is right",
    };
    // The driver's message may quote the URL it was given.
    let source = redact(&err.to_string());
    Error::unavailable(format!("cannot open {location}: {hint}"), source)
}

fn migrate_error(location: &str, err: MigrateError) -> Error {
    match err {
        MigrateError::VersionMissing(version) => Error::NotSupported(format!(
            "{location} was set up by a newer butler (it has migration {version}, which this \
             build does not know); upgrade butler, or use another schema"
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
    fn reads_what_a_foreign_key_failure_names() {
        assert_eq!(
            missing_reference(r#"Key (workflow_id)=(7) is not present in table "workflows"."#),
            Some((Kind::Workflow, "7".to_owned()))
        );
        assert_eq!(
            missing_reference(
                r#"Key (run_config_id)=(0190c5d6-0000-7000-8000-000000000000) is not present in table "configs"."#
            ),
            Some((
                Kind::Config,
                "0190c5d6-0000-7000-8000-000000000000".to_owned()
            ))
        );
        assert_eq!(missing_reference("something else"), None);
    }

    #[test]
    fn labels_runs_by_file_or_position() {
        assert_eq!(source_label(Some("s1.json"), 0), "s1.json");
        assert_eq!(source_label(None, 2), "run config #3");
    }

    #[test]
    fn sessions_set_the_schema_and_durability() {
        let config =
            PgConfig::from_url("postgres://h/db?schema=team_b&durability=normal").expect("url");
        assert_eq!(
            session_sql(&config),
            "SET search_path TO \"team_b\"; SET synchronous_commit TO off"
        );
        let options = config.connect_options().expect("options");
        assert_eq!(
            describe(&config, &options),
            "the PostgreSQL database `db` at h:5432 (schema `team_b`)"
        );
    }
}
