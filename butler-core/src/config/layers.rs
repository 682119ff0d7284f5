//! Deep merge of config layers and the provenance of every effective key.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::RUN_ID_KEY;

/// Deep-merges `layers` in order; a later layer wins.
///
/// The rules, applied recursively:
/// - two objects merge key by key;
/// - anything else (array, scalar, `null`) replaces what was there, so a `null` in a later
///   layer sets the key to `null` and an array is never merged element-wise;
/// - an object over a non-object, or a non-object over an object, replaces it whole;
/// - a `null` layer counts as `{}` (a layer that is missing).
///
/// Key order is kept: the keys of earlier layers come first, and keys a layer adds are
/// appended in that layer's order.
///
/// ```
/// use butler_core::config::merge;
/// use serde_json::json;
///
/// let workflow = json!({"tools": {"bwa": {"threads": 4, "mem": "8G"}}, "refs": ["a", "b"]});
/// let run = json!({"tools": {"bwa": {"threads": 16}}, "refs": ["c"], "sample": "S1"});
/// assert_eq!(
///     merge(&[&workflow, &run]),
///     json!({"tools": {"bwa": {"threads": 16, "mem": "8G"}}, "refs": ["c"], "sample": "S1"}),
/// );
/// ```
pub fn merge(layers: &[&Value]) -> Value {
    let mut merged = Value::Object(Map::new());
    for layer in layers {
        if layer.is_null() {
            continue;
        }
        merge_into(&mut merged, layer);
    }
    merged
}

fn merge_into(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge_into(existing, value);
                    }
                    // With `preserve_order`, `insert` on an existing key keeps its position.
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

/// The layer a key of an effective config comes from, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// The workflow's config, given at `create-workflow`.
    Workflow,
    /// The analysis's config, given at `create-analysis`.
    Analysis,
    /// The run's own config file, given at launch.
    Run,
    /// Set by Butler itself: the injected `analysis_run_id`.
    Butler,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Workflow => "workflow",
            Layer::Analysis => "analysis",
            Layer::Run => "run",
            Layer::Butler => "butler",
        })
    }
}

/// Where one leaf of an effective config comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The keys leading to the leaf, joined with `.` (`tools.bwa.threads`).
    pub path: String,
    /// The layer that set the leaf.
    pub layer: Layer,
    /// The leaf's value in the effective config.
    pub value: Value,
}

/// Which layer set each leaf of `effective`, in the effective config's key order.
///
/// A leaf is any value that is not an object, or an empty object; arrays are leaves because a
/// later layer replaces them whole. A leaf is credited to the last of `workflow`, `analysis`
/// and `run` that defines that exact path; the top-level `analysis_run_id`, and anything no
/// layer defines, is credited to [`Layer::Butler`]. Pass `Value::Null` for a missing layer.
///
/// ```
/// use butler_core::config::{explain, merge, Layer};
/// use serde_json::json;
///
/// let (workflow, analysis, run) = (json!({"a": 1, "b": 2}), json!({"b": 3}), json!({}));
/// let effective = merge(&[&workflow, &analysis, &run]);
/// let layers: Vec<_> = explain(&workflow, &analysis, &run, &effective)
///     .into_iter()
///     .map(|p| (p.path, p.layer))
///     .collect();
/// assert_eq!(layers, [("a".to_owned(), Layer::Workflow), ("b".to_owned(), Layer::Analysis)]);
/// ```
pub fn explain(
    workflow: &Value,
    analysis: &Value,
    run: &Value,
    effective: &Value,
) -> Vec<Provenance> {
    let layers = [
        (Layer::Workflow, workflow),
        (Layer::Analysis, analysis),
        (Layer::Run, run),
    ];
    let mut out = Vec::new();
    let mut path = Vec::new();
    collect_leaves(effective, &mut path, &layers, &mut out);
    out
}

fn collect_leaves<'a>(
    value: &'a Value,
    path: &mut Vec<&'a str>,
    layers: &[(Layer, &Value); 3],
    out: &mut Vec<Provenance>,
) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                path.push(key);
                collect_leaves(child, path, layers, out);
                path.pop();
            }
        }
        leaf => {
            let layer = if path.as_slice() == [RUN_ID_KEY] {
                Layer::Butler
            } else {
                layers
                    .iter()
                    .rev()
                    .find(|(_, layer)| lookup(layer, path).is_some())
                    .map_or(Layer::Butler, |(layer, _)| *layer)
            };
            out.push(Provenance {
                path: path.join("."),
                layer,
                value: leaf.clone(),
            });
        }
    }
}

fn lookup<'v>(value: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter()
        .try_fold(value, |node, key| node.as_object()?.get(*key))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn keys(value: &Value) -> Vec<&str> {
        value
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    #[test]
    fn nested_objects_merge_key_by_key() {
        let a = json!({"tools": {"bwa": {"threads": 4, "mem": "8G"}, "gatk": {"v": 4}}});
        let b = json!({"tools": {"bwa": {"threads": 16}}});
        assert_eq!(
            merge(&[&a, &b]),
            json!({"tools": {"bwa": {"threads": 16, "mem": "8G"}, "gatk": {"v": 4}}})
        );
    }

    #[test]
    fn arrays_are_replaced_not_merged() {
        let a = json!({"refs": ["a", "b", "c"]});
        let b = json!({"refs": ["z"]});
        assert_eq!(merge(&[&a, &b]), json!({"refs": ["z"]}));
    }

    #[test]
    fn scalars_are_replaced() {
        let a = json!({"n": 1, "s": "x", "keep": true});
        let b = json!({"n": "one", "s": false});
        assert_eq!(
            merge(&[&a, &b]),
            json!({"n": "one", "s": false, "keep": true})
        );
    }

    #[test]
    fn null_in_a_later_layer_sets_the_key_to_null() {
        let a = json!({"x": {"deep": 1}, "y": 2});
        let b = json!({"x": null});
        assert_eq!(merge(&[&a, &b]), json!({"x": null, "y": 2}));
    }

    #[test]
    fn object_over_scalar_replaces() {
        let a = json!({"x": 5});
        let b = json!({"x": {"y": 1}});
        assert_eq!(merge(&[&a, &b]), json!({"x": {"y": 1}}));
    }

    #[test]
    fn scalar_over_object_replaces() {
        let a = json!({"x": {"y": 1, "z": 2}});
        let b = json!({"x": [1]});
        assert_eq!(merge(&[&a, &b]), json!({"x": [1]}));
    }

    #[test]
    fn missing_layers_count_as_empty() {
        let a = json!({"x": 1});
        let empty = Value::Object(Map::new());
        assert_eq!(merge(&[&a, &empty, &Value::Null]), json!({"x": 1}));
        assert_eq!(merge(&[&Value::Null, &Value::Null]), json!({}));
        assert_eq!(merge(&[]), json!({}));
    }

    #[test]
    fn three_layers_later_wins() {
        let workflow = json!({"a": 1, "b": 1, "c": {"d": 1, "e": 1}});
        let analysis = json!({"b": 2, "c": {"d": 2}});
        let run = json!({"c": {"e": 3}, "f": 3});
        assert_eq!(
            merge(&[&workflow, &analysis, &run]),
            json!({"a": 1, "b": 2, "c": {"d": 2, "e": 3}, "f": 3})
        );
    }

    #[test]
    fn key_order_is_earlier_layers_first_then_new_keys_in_layer_order() {
        let a = json!({"zeta": 1, "alpha": 1, "mid": {"q": 1, "b": 1}});
        let b = json!({"new2": 2, "alpha": 2, "new1": 2, "mid": {"a": 2, "q": 2}});
        let c = json!({"last": 3, "zeta": 3});
        let merged = merge(&[&a, &b, &c]);
        assert_eq!(
            keys(&merged),
            ["zeta", "alpha", "mid", "new2", "new1", "last"]
        );
        assert_eq!(keys(&merged["mid"]), ["q", "b", "a"]);
    }

    #[test]
    fn layer_names() {
        assert_eq!(Layer::Workflow.to_string(), "workflow");
        assert_eq!(Layer::Analysis.to_string(), "analysis");
        assert_eq!(Layer::Run.to_string(), "run");
        assert_eq!(Layer::Butler.to_string(), "butler");
        assert_eq!(
            serde_json::to_value(Layer::Butler).ok(),
            Some(json!("butler"))
        );
    }

    fn explained(workflow: &Value, analysis: &Value, run: &Value) -> Vec<(String, Layer, Value)> {
        let effective = super::super::effective_for_run(merge(&[workflow, analysis, run]), 42);
        explain(workflow, analysis, run, &effective)
            .into_iter()
            .map(|p| (p.path, p.layer, p.value))
            .collect()
    }

    #[test]
    fn explain_credits_each_leaf_to_the_last_layer_that_set_it() {
        let workflow = json!({"tools": {"bwa": {"threads": 4, "mem": "8G"}}, "genome": "hg19"});
        let analysis = json!({"genome": "hg38", "tools": {"bwa": {"mem": "16G"}}});
        let run = json!({"sample": "S1", "tools": {"bwa": {"threads": 8}}});
        assert_eq!(
            explained(&workflow, &analysis, &run),
            [
                ("tools.bwa.threads".to_owned(), Layer::Run, json!(8)),
                ("tools.bwa.mem".to_owned(), Layer::Analysis, json!("16G")),
                ("genome".to_owned(), Layer::Analysis, json!("hg38")),
                ("sample".to_owned(), Layer::Run, json!("S1")),
                ("analysis_run_id".to_owned(), Layer::Butler, json!(42)),
            ]
        );
    }

    #[test]
    fn explain_treats_arrays_and_empty_objects_as_leaves() {
        let workflow = json!({"refs": ["a", "b"], "opts": {}, "x": {"y": 1}});
        let analysis = json!({"refs": ["c"]});
        let run = json!({"x": 7});
        assert_eq!(
            explained(&workflow, &analysis, &run),
            [
                ("refs".to_owned(), Layer::Analysis, json!(["c"])),
                ("opts".to_owned(), Layer::Workflow, json!({})),
                ("x".to_owned(), Layer::Run, json!(7)),
                ("analysis_run_id".to_owned(), Layer::Butler, json!(42)),
            ]
        );
    }

    #[test]
    fn explain_credits_analysis_run_id_to_butler_even_if_a_run_config_sets_it() {
        let run = json!({"analysis_run_id": 1});
        let got = explained(&Value::Null, &Value::Null, &run);
        assert_eq!(
            got,
            [("analysis_run_id".to_owned(), Layer::Butler, json!(42))]
        );
    }

    #[test]
    fn explain_credits_an_object_that_replaced_a_scalar_to_its_layer() {
        let workflow = json!({"db": "sqlite", "keep": {"n": 1}});
        let analysis = json!({"db": {"url": "x", "pool": 2}});
        let got = explained(&workflow, &analysis, &Value::Null);
        assert_eq!(
            got,
            [
                ("db.url".to_owned(), Layer::Analysis, json!("x")),
                ("db.pool".to_owned(), Layer::Analysis, json!(2)),
                ("keep.n".to_owned(), Layer::Workflow, json!(1)),
                ("analysis_run_id".to_owned(), Layer::Butler, json!(42)),
            ]
        );
    }
}
