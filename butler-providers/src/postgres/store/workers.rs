//! The worker list and role leases.

use std::time::Duration;

use butler_core::Result;
use butler_core::model::{RoleLease, WorkerInfo};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{Decoded, PgStore, from_ms};

/// The database server's clock in unix milliseconds: every lease is measured on it.
const SERVER_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

impl PgStore {
    /// [`butler_core::RunStore::heartbeat_worker`].
    pub(super) async fn upsert_worker(&self, worker: &WorkerInfo) -> Result<()> {
        sqlx::query(
            "INSERT INTO workers \
             (name, host, pid, queue, slots, running, version, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
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

    /// [`butler_core::RunStore::forget_worker`].
    pub(super) async fn delete_worker(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("remove worker {name}"), e))?;
        Ok(())
    }

    /// [`butler_core::RunStore::list_workers`].
    pub(super) async fn select_workers(&self) -> Result<Vec<WorkerInfo>> {
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

    /// [`butler_core::RunStore::try_lead`]: one statement, which PostgreSQL runs as one atomic
    /// step: of racing inserts of a new role one wins and the others find its row, and the
    /// update happens only if the role is free, ended, or already this holder's.
    pub(super) async fn take_lease(&self, role: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let sql = format!(
            "INSERT INTO role_leases (role, holder, since, until) \
             SELECT $1, $2, n.ms, n.ms + LEAST($3, $4 - n.ms) FROM (SELECT {SERVER_MS} AS ms) AS n \
             ON CONFLICT (role) DO UPDATE SET \
             since = CASE WHEN role_leases.holder = excluded.holder \
                          THEN role_leases.since ELSE excluded.since END, \
             holder = excluded.holder, until = excluded.until \
             WHERE role_leases.holder = excluded.holder OR role_leases.until <= excluded.since"
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(role)
            .bind(holder)
            .bind(ttl_ms)
            .bind(latest_ms())
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("take the {role} lease for {holder}"), e))?;
        Ok(done.rows_affected() == 1)
    }

    /// [`butler_core::RunStore::resign`].
    pub(super) async fn end_lease(&self, role: &str, holder: &str) -> Result<()> {
        let sql = format!(
            "UPDATE role_leases SET until = n.ms FROM (SELECT {SERVER_MS} AS ms) AS n \
             WHERE role = $1 AND holder = $2 AND until > n.ms"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(role)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("end {holder}'s {role} lease"), e))?;
        Ok(())
    }

    /// [`butler_core::RunStore::leader`].
    pub(super) async fn select_lease(&self, role: &str) -> Result<Option<RoleLease>> {
        let row = sqlx::query("SELECT role, holder, since, until FROM role_leases WHERE role = $1")
            .bind(role)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("read the {role} lease"), e))?;
        row.as_ref()
            .map(lease_from_row)
            .transpose()
            .map_err(|e| self.corrupt("a role lease", e))
    }
}

/// The latest time Butler can read back, in milliseconds: longer leases end then.
fn latest_ms() -> i64 {
    DateTime::<Utc>::MAX_UTC.timestamp_millis()
}

fn worker_from_row(row: &PgRow) -> Decoded<WorkerInfo> {
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

fn lease_from_row(row: &PgRow) -> Decoded<RoleLease> {
    Ok(RoleLease {
        role: row.try_get(0)?,
        holder: row.try_get(1)?,
        since: from_ms(row.try_get(2)?)?,
        until: from_ms(row.try_get(3)?)?,
    })
}
