//! Layered JSON config: the stored [`Config`], the merge of layers, the provenance of each
//! effective key, config files and hashing.

mod files;
mod layers;

pub(crate) use files::{json_error_message, json_type_name};
pub use files::{read_json_file, require_object, run_config_files};
pub use layers::{Layer, Provenance, explain, merge};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::Id;

/// The key Butler injects into every run's effective config.
pub const RUN_ID_KEY: &str = "analysis_run_id";

/// A stored, immutable JSON config with its id and content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Identifier, printed by `list-workflows` and accepted by `print-config`.
    pub id: Uuid,
    /// The JSON document.
    pub data: Value,
    /// Hex sha256 of the canonical form of `data` (see [`sha256`]).
    pub sha256: String,
}

impl Config {
    /// A new config with a fresh id and its hash.
    pub fn new(data: Value) -> Self {
        Config {
            id: Uuid::now_v7(),
            sha256: sha256(&data),
            data,
        }
    }
}

/// Hex sha256 of `value`'s canonical form: object keys sorted, no insignificant whitespace, so
/// the same document always has the same hash whatever its key order or layout.
pub fn sha256(value: &Value) -> String {
    let mut hasher = Sha256::new();
    write_canonical(value, &mut hasher);
    hex::encode(hasher.finalize())
}

fn write_canonical(value: &Value, hasher: &mut Sha256) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            hasher.update(b"{");
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    hasher.update(b",");
                }
                hasher.update(Value::String(key.clone()).to_string().as_bytes());
                hasher.update(b":");
                write_canonical(&map[key], hasher);
            }
            hasher.update(b"}");
        }
        Value::Array(items) => {
            hasher.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    hasher.update(b",");
                }
                write_canonical(item, hasher);
            }
            hasher.update(b"]");
        }
        scalar => hasher.update(scalar.to_string().as_bytes()),
    }
}

/// The effective config of run `run_id`: the merged layers with `analysis_run_id` injected.
pub fn effective_for_run(mut merged: Value, run_id: Id) -> Value {
    if let Value::Object(map) = &mut merged {
        map.insert(RUN_ID_KEY.to_owned(), Value::from(run_id));
    }
    merged
}
