//! RabbitMQ queue.
