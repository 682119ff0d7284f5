//! RabbitMQ queue tests.
