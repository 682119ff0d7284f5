//! `Task`: one task of a run.

use butler_core::model::{Id, TaskInstance};
use chrono::{DateTime, Utc};
use pyo3::prelude::*;

use crate::convert::{repr_opt, repr_str};

/// One task of a run, as it was stored when this object was made.
#[pyclass(frozen, module = "butler")]
pub struct Task {
    task: TaskInstance,
}

impl Task {
    pub(crate) fn new(task: TaskInstance) -> Self {
        Task { task }
    }
}

#[pymethods]
impl Task {
    /// The run it belongs to.
    #[getter]
    fn run_id(&self) -> Id {
        self.task.run_id
    }

    /// Its id in the workflow definition.
    #[getter]
    fn task_id(&self) -> &str {
        &self.task.task_id
    }

    /// `pending`, `queued`, `running`, `succeeded`, `failed`, `up_for_retry`,
    /// `upstream_failed`, `skipped`, `timed_out` or `cancelled`.
    #[getter]
    fn state(&self) -> &'static str {
        self.task.state.as_str()
    }

    /// Number of the current or last attempt; 0 before the first.
    #[getter]
    fn try_number(&self) -> u32 {
        self.task.try_number
    }

    /// Attempts that failed through the task's own fault.
    #[getter]
    fn failures(&self) -> u32 {
        self.task.failures
    }

    /// The worker (`HOST/PID`) that runs or ran the current attempt.
    #[getter]
    fn worker(&self) -> Option<&str> {
        self.task.worker.as_deref()
    }

    /// When it was last queued (UTC).
    #[getter]
    fn queued_at(&self) -> Option<DateTime<Utc>> {
        self.task.queued_at
    }

    /// When the current or last attempt started (UTC).
    #[getter]
    fn started_at(&self) -> Option<DateTime<Utc>> {
        self.task.started_at
    }

    /// When the last attempt ended (UTC).
    #[getter]
    fn ended_at(&self) -> Option<DateTime<Utc>> {
        self.task.ended_at
    }

    /// When an `up_for_retry` task's next attempt is due (UTC).
    #[getter]
    fn next_try_at(&self) -> Option<DateTime<Utc>> {
        self.task.next_try_at
    }

    /// Exit code of the last attempt, when it exited.
    #[getter]
    fn exit_code(&self) -> Option<i32> {
        self.task.exit_code
    }

    /// Why the last attempt failed.
    #[getter]
    fn error(&self) -> Option<&str> {
        self.task.error.as_deref()
    }

    fn __repr__(&self) -> String {
        let task = &self.task;
        format!(
            "Task(run_id={}, task_id={}, state={}, try_number={}, exit_code={}, error={})",
            task.run_id,
            repr_str(&task.task_id),
            repr_str(task.state.as_str()),
            task.try_number,
            task.exit_code
                .map_or_else(|| "None".to_owned(), |code| code.to_string()),
            repr_opt(task.error.as_deref()),
        )
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.task == other.task
    }

    fn __hash__(&self) -> u64 {
        hash_of(&(self.task.run_id, &self.task.task_id, self.task.try_number))
    }
}

/// A hash of `value` for `__hash__`.
pub(crate) fn hash_of(value: &impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}
