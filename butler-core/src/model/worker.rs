use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A worker process as it last reported itself to the store (`butler list-workers`).
///
/// A worker records itself when it starts and again every few seconds (its heartbeat); one
/// whose heartbeats stopped is [lost](WorkerInfo::is_lost). The tasks a lost worker was
/// running come back when their leases expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique among the workers of a store: `HOST/PID` by default, or the name the worker was
    /// given (`butler worker --name`).
    pub name: String,
    /// The host the worker runs on.
    pub host: String,
    /// The worker's process id on its host.
    pub pid: u32,
    /// The queue it takes task attempts from.
    pub queue: String,
    /// Attempts it runs at once.
    pub slots: u32,
    /// Slots in use at its last heartbeat.
    pub running: u32,
    /// The Butler version it runs.
    pub version: String,
    /// When the worker started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
}

impl WorkerInfo {
    /// Whether the worker's last heartbeat is more than `after` before `now`.
    pub fn is_lost(&self, now: DateTime<Utc>, after: Duration) -> bool {
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        now.signed_duration_since(self.heartbeat_at) > after
    }
}

/// Who holds the lease of a role (such as the scheduler's), as recorded by
/// [`RunStore::try_lead`](crate::RunStore::try_lead).
///
/// A lease that ended (its holder resigned or stopped renewing it) stays recorded until another
/// holder takes the role, so readers can tell when the role was last held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleLease {
    /// The role, e.g. [`SCHEDULER_ROLE`](crate::engine::SCHEDULER_ROLE).
    pub role: String,
    /// Who holds, or last held, it.
    pub holder: String,
    /// When this holder took the role.
    pub since: DateTime<Utc>,
    /// When the lease ends unless its holder renews it; in the past once it ended.
    pub until: DateTime<Utc>,
}

impl RoleLease {
    /// Whether the lease is still in force at `now`.
    pub fn is_held(&self, now: DateTime<Utc>) -> bool {
        self.until > now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(heartbeat_at: DateTime<Utc>) -> WorkerInfo {
        WorkerInfo {
            name: "w1".to_owned(),
            host: "h".to_owned(),
            pid: 7,
            queue: "q".to_owned(),
            slots: 2,
            running: 1,
            version: "0.1.0".to_owned(),
            started_at: heartbeat_at,
            heartbeat_at,
        }
    }

    #[test]
    fn a_worker_is_lost_only_once_its_silence_exceeds_the_limit() {
        let now = Utc::now();
        let limit = Duration::from_secs(15);
        assert!(!worker(now).is_lost(now, limit));
        assert!(!worker(now - chrono::Duration::seconds(15)).is_lost(now, limit));
        assert!(worker(now - chrono::Duration::seconds(16)).is_lost(now, limit));
        // A heartbeat from a clock slightly ahead is not lost.
        assert!(!worker(now + chrono::Duration::seconds(2)).is_lost(now, limit));
        assert!(!worker(now - chrono::Duration::days(365)).is_lost(now, Duration::MAX));
    }

    #[test]
    fn a_lease_is_held_until_its_end() {
        let now = Utc::now();
        let lease = RoleLease {
            role: "scheduler".to_owned(),
            holder: "h/1 #1".to_owned(),
            since: now,
            until: now + chrono::Duration::seconds(10),
        };
        assert!(lease.is_held(now));
        assert!(!lease.is_held(lease.until));
    }
}
