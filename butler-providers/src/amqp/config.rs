//! RabbitMQ settings.
