//! RabbitMQ backend: a [`Queue`](butler_core::queue::Queue) over AMQP 0-9-1.
//!
//! [`AmqpQueue::connect`] takes a URL such as
//! `amqp://user:password@host:5672/%2f?prefix=butler`; see [`AmqpConfig`] for its parameters and
//! [`AmqpQueue`] for how Butler's queues are laid out on the broker and how its contract is kept.
//! The run store lives elsewhere (SQLite or PostgreSQL): RabbitMQ only carries the messages.

mod config;
mod queue;

pub use config::{AmqpConfig, MAX_PREFIX_LEN};
pub use queue::AmqpQueue;
