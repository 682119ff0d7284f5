//! `Event`: one entry of a run's event log.

use butler_core::model::{self, Id};
use chrono::{DateTime, Utc};
use pyo3::prelude::*;

use crate::convert::{repr_opt, repr_str};

/// One state change of a run or of one of its tasks.
#[pyclass(frozen, module = "butler")]
pub struct Event {
    event: model::Event,
}

impl Event {
    pub(crate) fn new(event: model::Event) -> Self {
        Event { event }
    }
}

#[pymethods]
impl Event {
    /// Position in the log; increases with every event.
    #[getter]
    fn id(&self) -> Id {
        self.event.id
    }

    /// When the change was committed (UTC).
    #[getter]
    fn at(&self) -> DateTime<Utc> {
        self.event.at
    }

    /// The run concerned.
    #[getter]
    fn run_id(&self) -> Id {
        self.event.run_id
    }

    /// The task concerned; `None` for a change of the run's own status.
    #[getter]
    fn task_id(&self) -> Option<&str> {
        self.event.task_id.as_deref()
    }

    /// The task's attempt number, for task changes.
    #[getter]
    fn try_number(&self) -> Option<u32> {
        self.event.try_number
    }

    /// The state before.
    #[getter(from_state)]
    fn state_before(&self) -> &str {
        &self.event.from
    }

    /// The state after.
    #[getter(to_state)]
    fn state_after(&self) -> &str {
        &self.event.to
    }

    /// Who made the change: `scheduler`, `worker HOST/PID`, `cli`.
    #[getter]
    fn by(&self) -> &str {
        &self.event.by
    }

    /// Why.
    #[getter]
    fn reason(&self) -> &str {
        &self.event.reason
    }

    fn __repr__(&self) -> String {
        let event = &self.event;
        format!(
            "Event(id={}, run_id={}, task_id={}, try_number={}, from_state={}, to_state={}, \
             by={}, reason={})",
            event.id,
            event.run_id,
            repr_opt(event.task_id.as_deref()),
            event
                .try_number
                .map_or_else(|| "None".to_owned(), |n| n.to_string()),
            repr_str(&event.from),
            repr_str(&event.to),
            repr_str(&event.by),
            repr_str(&event.reason),
        )
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.event == other.event
    }

    fn __hash__(&self) -> u64 {
        self.event.id as u64
    }
}
