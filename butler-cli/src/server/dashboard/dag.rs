//! A workflow's DAG laid out for an SVG: tasks in columns by dependency depth, left to right,
//! with an arrow from each needed task to the task that needs it.

use std::collections::HashMap;

use butler_core::definition::Definition;
use serde::Serialize;

use super::format::truncate;

const NODE_HEIGHT: f64 = 46.0;
const MIN_NODE_WIDTH: f64 = 120.0;
const MAX_NODE_WIDTH: f64 = 240.0;
const COLUMN_GAP: f64 = 56.0;
const ROW_GAP: f64 = 14.0;
const PADDING: f64 = 10.0;
/// Characters of a task id shown in a node; the whole id is in the node's tooltip.
const LABEL_CHARS: usize = 28;
/// Width of one character of a node's label, in pixels, at the node font's size.
const CHAR_WIDTH: f64 = 7.6;
/// The same for the smaller detail line.
const DETAIL_CHAR_WIDTH: f64 = 6.4;

/// The laid-out graph.
#[derive(Debug, Clone, Serialize)]
pub struct Dag {
    /// Width of the drawing, in pixels.
    pub width: f64,
    /// Height of the drawing, in pixels.
    pub height: f64,
    /// One box per task.
    pub nodes: Vec<Node>,
    /// One arrow per dependency.
    pub edges: Vec<Edge>,
}

/// One task's box.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// The task's id.
    pub id: String,
    /// The id as shown, cut when long.
    pub label: String,
    /// The state the box is coloured by (a task state, or `definition` without a run).
    pub state: String,
    /// The second line: state and try.
    pub detail: String,
    /// Where a click on the box leads, if anywhere.
    pub href: Option<String>,
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

/// One dependency's arrow.
#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    /// The needed task.
    pub from: String,
    /// The task that needs it.
    pub to: String,
    /// SVG path data.
    pub path: String,
}

/// What a node shows besides its id.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The state to colour it by.
    pub state: String,
    /// The second line.
    pub detail: String,
    /// Where a click leads.
    pub href: Option<String>,
}

/// Lays out `definition`'s tasks: each task's column is one more than the deepest task it
/// needs; within a column, tasks sit near the tasks they need (the mean of their rows), so
/// arrows cross less.
pub fn layout(definition: &Definition, info: impl Fn(&str) -> NodeInfo) -> Dag {
    let order = definition.topological_order();
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for task in &order {
        let d = task
            .needs
            .iter()
            .filter_map(|need| depth.get(need.as_str()))
            .map(|d| d + 1)
            .max()
            .unwrap_or(0);
        depth.insert(task.id.as_str(), d);
    }
    let columns = depth.values().copied().max().map_or(0, |d| d + 1);
    // File order inside a column, then each column sorted by the mean row of what it needs.
    let mut layers: Vec<Vec<&str>> = vec![Vec::new(); columns];
    for task in &definition.tasks {
        if let Some(&d) = depth.get(task.id.as_str()) {
            layers[d].push(task.id.as_str());
        }
    }
    let mut row: HashMap<&str, f64> = HashMap::new();
    for layer in &mut layers {
        let key = |id: &str| -> f64 {
            let needs: Vec<f64> = definition
                .task(id)
                .map(|t| {
                    t.needs
                        .iter()
                        .filter_map(|n| row.get(n.as_str()).copied())
                        .collect()
                })
                .unwrap_or_default();
            if needs.is_empty() {
                f64::INFINITY
            } else {
                needs.iter().sum::<f64>() / needs.len() as f64
            }
        };
        let mut keyed: Vec<(f64, usize, &str)> = layer
            .iter()
            .enumerate()
            .map(|(i, id)| (key(id), i, *id))
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        *layer = keyed.into_iter().map(|(_, _, id)| id).collect();
        for (i, id) in layer.iter().enumerate() {
            row.insert(id, i as f64);
        }
    }

    let infos: HashMap<&str, NodeInfo> =
        layers.iter().flatten().map(|id| (*id, info(id))).collect();
    let tallest = layers.iter().map(Vec::len).max().unwrap_or(0) as f64;
    let height = PADDING * 2.0 + tallest * NODE_HEIGHT + (tallest - 1.0).max(0.0) * ROW_GAP;
    let mut nodes = Vec::with_capacity(order.len());
    let mut boxes: HashMap<&str, (f64, f64, f64)> = HashMap::new();
    let mut x = PADDING;
    for layer in &layers {
        let width = layer
            .iter()
            .map(|id| node_width(id, infos.get(id).map_or("", |i| i.detail.as_str())))
            .fold(MIN_NODE_WIDTH, f64::max);
        let column_height =
            layer.len() as f64 * NODE_HEIGHT + (layer.len() as f64 - 1.0).max(0.0) * ROW_GAP;
        let mut y = (height - column_height) / 2.0;
        for id in layer {
            let NodeInfo {
                state,
                detail,
                href,
            } = infos.get(id).cloned().unwrap_or(NodeInfo {
                state: "pending".to_owned(),
                detail: String::new(),
                href: None,
            });
            nodes.push(Node {
                id: (*id).to_owned(),
                label: truncate(id, LABEL_CHARS),
                state,
                detail,
                href,
                x,
                y,
                w: width,
                h: NODE_HEIGHT,
            });
            boxes.insert(id, (x, y, width));
            y += NODE_HEIGHT + ROW_GAP;
        }
        x += width + COLUMN_GAP;
    }
    let width = (x - COLUMN_GAP + PADDING).max(PADDING * 2.0);

    let mut edges = Vec::new();
    for task in &definition.tasks {
        let Some(&(tx, ty, _)) = boxes.get(task.id.as_str()) else {
            continue;
        };
        for need in &task.needs {
            let Some(&(fx, fy, fw)) = boxes.get(need.as_str()) else {
                continue;
            };
            let (x1, y1) = (fx + fw, fy + NODE_HEIGHT / 2.0);
            // Stop short of the box so the arrowhead's tip touches its edge.
            let (x2, y2) = (tx - 2.0, ty + NODE_HEIGHT / 2.0);
            let bend = ((x2 - x1) / 2.0).max(16.0);
            edges.push(Edge {
                from: need.clone(),
                to: task.id.clone(),
                path: format!(
                    "M{x1:.1} {y1:.1} C{:.1} {y1:.1} {:.1} {y2:.1} {x2:.1} {y2:.1}",
                    x1 + bend,
                    x2 - bend
                ),
            });
        }
    }
    Dag {
        width,
        height,
        nodes,
        edges,
    }
}

/// A box wide enough for its id (cut at [`LABEL_CHARS`]) and its detail line.
fn node_width(id: &str, detail: &str) -> f64 {
    let label = id.chars().count().min(LABEL_CHARS) as f64 * CHAR_WIDTH;
    let detail = detail.chars().count() as f64 * DETAIL_CHAR_WIDTH;
    (label.max(detail) + 40.0).clamp(MIN_NODE_WIDTH, MAX_NODE_WIDTH)
}

#[cfg(test)]
mod tests {
    use butler_core::definition::Format;

    use super::*;

    fn definition(toml: &str) -> Definition {
        Definition::parse(toml, Format::Toml, "test.toml").expect("a valid definition")
    }

    fn plain(id: &str) -> NodeInfo {
        NodeInfo {
            state: "pending".into(),
            detail: format!("{id} detail"),
            href: None,
        }
    }

    #[test]
    fn tasks_sit_in_columns_by_depth_with_an_arrow_per_need() {
        let def = definition(
            r#"
            [[tasks]]
            id = "report"
            needs = ["align", "qc"]
            run = "true"
            [[tasks]]
            id = "fetch"
            run = "true"
            [[tasks]]
            id = "align"
            needs = ["fetch"]
            run = "true"
            [[tasks]]
            id = "qc"
            needs = ["fetch"]
            run = "true"
            "#,
        );
        let dag = layout(&def, plain);
        let x = |id: &str| dag.nodes.iter().find(|n| n.id == id).expect(id).x;
        assert!(x("fetch") < x("align"));
        assert_eq!(x("align"), x("qc"));
        assert!(x("qc") < x("report"));
        assert_eq!(dag.edges.len(), 4);
        let pairs: Vec<(&str, &str)> = dag
            .edges
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect();
        assert!(pairs.contains(&("align", "report")) && pairs.contains(&("fetch", "qc")));
        // Every node lies inside the drawing.
        for node in &dag.nodes {
            assert!(node.x >= 0.0 && node.x + node.w <= dag.width, "{node:?}");
            assert!(node.y >= 0.0 && node.y + node.h <= dag.height, "{node:?}");
        }
        assert_eq!(dag.nodes[0].detail, "fetch detail");
    }

    #[test]
    fn a_task_sits_beside_what_it_needs() {
        let def = definition(
            r#"
            [[tasks]]
            id = "a"
            run = "true"
            [[tasks]]
            id = "b"
            run = "true"
            [[tasks]]
            id = "after_b"
            needs = ["b"]
            run = "true"
            [[tasks]]
            id = "after_a"
            needs = ["a"]
            run = "true"
            "#,
        );
        let dag = layout(&def, plain);
        let y = |id: &str| dag.nodes.iter().find(|n| n.id == id).expect(id).y;
        assert!(y("after_a") < y("after_b"), "rows follow the needed tasks");
        assert_eq!(y("a"), y("after_a"));
    }

    #[test]
    fn long_ids_are_cut_and_boxes_stay_bounded() {
        let long = "a_very_long_task_identifier_that_goes_on_and_on";
        let def = definition(&format!("[[tasks]]\nid = \"{long}\"\nrun = \"true\"\n"));
        let dag = layout(&def, plain);
        assert!(dag.nodes[0].label.ends_with('…'));
        assert!(dag.nodes[0].w <= MAX_NODE_WIDTH);
        assert_eq!(dag.nodes[0].id, long);
    }

    #[test]
    fn boxes_fit_their_detail_line() {
        let def = definition("[[tasks]]\nid = \"a\"\nrun = \"true\"\n");
        let short = layout(&def, plain).nodes[0].w;
        let long = layout(&def, |_| NodeInfo {
            state: "up_for_retry".into(),
            detail: "up for retry · try 12 of a long story".into(),
            href: None,
        })
        .nodes[0]
            .w;
        assert!(long > short, "{long} > {short}");
    }
}
