//! RabbitMQ backend: a queue over AMQP 0-9-1.

mod config;
mod queue;
