//! Load-time rewrite of the ONNX graph: gather embedding rows *before*
//! dequantizing them.
//!
//! Weight-only int8 exports (such as the all-MiniLM-L6-v2 int8 file inferd
//! ships by default) store an embedding table as an int8 initializer plus a
//! per-row float scale, and dequantize it in the graph:
//!
//! ```text
//!   q: int8 [rows, dim]   scale: f32 [rows, 1] (or a scalar)
//!   table = Mul(Cast(q, to=float), scale)        -- [rows, dim] f32
//!   out   = Gather(table, ids, axis=0)           -- [..ids, dim]
//! ```
//!
//! A runtime that folds constants turns `table` into a constant once. tract
//! does not fold a constant `Cast` whose output is over 4 MiB (the word
//! embedding table is 30522 × 384 × 4 B = 47 MB), so it dequantizes the whole
//! table on every run to then keep a few rows: about 25 ms of a ~31 ms
//! 8-token inference. Gathering first and dequantizing only the gathered rows
//! computes the same values:
//!
//! ```text
//!   out = Mul(Cast(Gather(q, ids), to=float), Gather(scale, ids))   -- per-row scale
//!   out = Mul(Cast(Gather(q, ids), to=float), scale)                 -- scale without a row axis
//! ```
//!
//! This is exact, not an approximation: every output element is still
//! `float(q[id, j]) * scale[id or 0, j or 0]`, the same single f32 product.
//!
//! The rewrite works on the protobuf, before tract parses it, and matches the
//! pattern by structure, never by tensor names, so it applies to any export
//! that dequantizes this way and is a no-op on graphs without the pattern
//! (fp32 models). Only the top-level graph is rewritten (not If/Loop bodies).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto,
};

/// Rewrites every `Gather(axis 0)` of `Mul(Cast(q), scale)`, where `q` and
/// `scale` are initializers and `scale` has no row axis or one row per row of
/// `q`, into a gather of the quantized rows followed by their dequantization.
/// The `Cast`/`Mul` of the whole table are removed when nothing else uses them.
///
/// Returns how many `Gather` nodes were rewritten (0: the graph is unchanged).
pub fn gather_before_dequantize(model: &mut ModelProto) -> usize {
    match model.graph.as_mut() {
        Some(graph) => rewrite_graph(graph),
        None => 0,
    }
}

/// What to do with the scale once the rows are gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScaleRows {
    /// The scale has one entry per table row (`[rows, ..]`): gather it with the
    /// same ids so each gathered row keeps its own scale.
    Gather,
    /// The scale has no row axis (scalar, or fewer dims than the table): it
    /// broadcasts over the gathered rows exactly as it did over the table.
    Keep,
}

/// One matched `Gather(Mul(Cast(q), scale), ids)`.
#[derive(Debug)]
struct Match {
    /// Index of the Gather node in `graph.node`.
    gather: usize,
    /// The int8 (or other integer) initializer holding the quantized table.
    quantized: String,
    /// The scale initializer.
    scale: String,
    scale_rows: ScaleRows,
    /// The Cast node's attributes (its `to`), reused for the gathered rows.
    cast_attributes: Vec<AttributeProto>,
    /// Outputs of the table-wide Cast and Mul, removed if they end up unused.
    table_tensors: [String; 2],
}

fn is_default_domain(node: &NodeProto) -> bool {
    node.domain.is_empty() || node.domain == "ai.onnx"
}

fn int_attribute(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// How the scale can follow a row gather, if it can: it must broadcast into
/// the table without enlarging it (each of its trailing dims is 1 or equal to
/// the table's), and its leading axis, if it aligns with the table's row axis,
/// must be one entry per row.
fn scale_rows(table_dims: &[i64], scale_dims: &[i64]) -> Option<ScaleRows> {
    if table_dims.is_empty() || scale_dims.len() > table_dims.len() {
        return None;
    }
    let broadcasts = scale_dims
        .iter()
        .rev()
        .zip(table_dims.iter().rev())
        .all(|(s, t)| *s == 1 || s == t);
    if !broadcasts {
        return None;
    }
    if scale_dims.len() < table_dims.len() {
        Some(ScaleRows::Keep)
    } else if scale_dims[0] == table_dims[0] {
        Some(ScaleRows::Gather)
    } else {
        // A `[1, ..]` scale of the table's full rank: after the gather it
        // could have more dims than the gathered rows (scalar ids), which would
        // change the output shape. Not worth handling: leave the graph as is.
        None
    }
}

fn find_matches(graph: &GraphProto) -> Vec<Match> {
    let initializer_dims: HashMap<&str, &[i64]> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    let producer: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();

    let mut matches = vec![];
    for (ix, gather) in graph.node.iter().enumerate() {
        if gather.op_type != "Gather"
            || !is_default_domain(gather)
            || gather.input.len() != 2
            || gather.output.len() != 1
            || int_attribute(gather, "axis").unwrap_or(0) != 0
        {
            continue;
        }
        let Some(mul) = producer.get(gather.input[0].as_str()) else {
            continue;
        };
        if mul.op_type != "Mul" || !is_default_domain(mul) || mul.input.len() != 2 {
            continue;
        }
        // Mul is commutative: the Cast may be either operand.
        let operands = [
            (&mul.input[0], &mul.input[1]),
            (&mul.input[1], &mul.input[0]),
        ];
        for (cast_out, scale) in operands {
            let Some(cast) = producer.get(cast_out.as_str()) else {
                continue;
            };
            if cast.op_type != "Cast" || !is_default_domain(cast) || cast.input.len() != 1 {
                continue;
            }
            let quantized = &cast.input[0];
            let (Some(table_dims), Some(scale_dims)) = (
                initializer_dims.get(quantized.as_str()),
                initializer_dims.get(scale.as_str()),
            ) else {
                continue;
            };
            let Some(scale_rows) = scale_rows(table_dims, scale_dims) else {
                continue;
            };
            matches.push(Match {
                gather: ix,
                quantized: quantized.clone(),
                scale: scale.clone(),
                scale_rows,
                cast_attributes: cast.attribute.clone(),
                table_tensors: [cast_out.clone(), gather.input[0].clone()],
            });
            break;
        }
    }
    matches
}

/// Hands out tensor names that collide with nothing in the graph.
struct Names(HashSet<String>);

impl Names {
    fn of(graph: &GraphProto) -> Names {
        let mut names = HashSet::new();
        for n in &graph.node {
            names.extend(n.input.iter().cloned());
            names.extend(n.output.iter().cloned());
        }
        names.extend(graph.initializer.iter().map(|t| t.name.clone()));
        names.extend(graph.input.iter().map(|v| v.name.clone()));
        names.extend(graph.output.iter().map(|v| v.name.clone()));
        Names(names)
    }

    fn fresh(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut n = 1;
        while self.0.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

fn node(
    op_type: &str,
    name: String,
    input: Vec<String>,
    output: String,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op_type.to_owned(),
        name,
        input,
        output: vec![output],
        attribute,
        ..NodeProto::default()
    }
}

/// The nodes that replace one matched Gather. The last one writes the
/// Gather's own output tensor, so its consumers are untouched.
fn replacement(m: &Match, gather: &NodeProto, names: &mut Names) -> Vec<NodeProto> {
    let out = &gather.output[0];
    let base = if gather.name.is_empty() {
        out.clone()
    } else {
        gather.name.clone()
    };
    let ids = gather.input[1].clone();
    let axis0 = vec![AttributeProto {
        name: "axis".to_owned(),
        r#type: AttributeType::Int as i32,
        i: 0,
        ..AttributeProto::default()
    }];

    let rows_q = names.fresh(format!("{out}/rows_quantized"));
    let rows_f = names.fresh(format!("{out}/rows_float"));
    let mut nodes = vec![
        node(
            "Gather",
            format!("{base}/gather_quantized_rows"),
            vec![m.quantized.clone(), ids.clone()],
            rows_q.clone(),
            axis0.clone(),
        ),
        node(
            "Cast",
            format!("{base}/cast_rows"),
            vec![rows_q],
            rows_f.clone(),
            m.cast_attributes.clone(),
        ),
    ];
    let scale = match m.scale_rows {
        ScaleRows::Gather => {
            let rows_scale = names.fresh(format!("{out}/rows_scale"));
            nodes.push(node(
                "Gather",
                format!("{base}/gather_scale_rows"),
                vec![m.scale.clone(), ids],
                rows_scale.clone(),
                axis0,
            ));
            rows_scale
        }
        ScaleRows::Keep => m.scale.clone(),
    };
    nodes.push(node(
        "Mul",
        format!("{base}/dequantize_rows"),
        vec![rows_f, scale],
        out.clone(),
        vec![],
    ));
    nodes
}

fn rewrite_graph(graph: &mut GraphProto) -> usize {
    let matches = find_matches(graph);
    if matches.is_empty() {
        return 0;
    }
    let mut names = Names::of(graph);

    // Splice each replacement where its Gather was: the new nodes read only
    // initializers and the Gather's ids, so the node list stays topologically
    // sorted, as ONNX requires.
    let mut by_gather: HashMap<usize, &Match> = matches.iter().map(|m| (m.gather, m)).collect();
    let old_nodes = std::mem::take(&mut graph.node);
    for (ix, n) in old_nodes.into_iter().enumerate() {
        match by_gather.remove(&ix) {
            Some(m) => graph.node.extend(replacement(m, &n, &mut names)),
            None => graph.node.push(n),
        }
    }

    // Drop the table-wide Mul, then Cast, once nothing reads them any more
    // (a tied LM head, say, may still use the dequantized table).
    let candidates: HashSet<String> = matches
        .iter()
        .flat_map(|m| m.table_tensors.iter().cloned())
        .collect();
    let mut removed: HashSet<String> = HashSet::new();
    loop {
        let used: HashSet<&str> = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter())
            .chain(graph.output.iter().map(|o| &o.name))
            .map(String::as_str)
            .collect();
        let dead: Vec<usize> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.output.len() == 1
                    && candidates.contains(&n.output[0])
                    && !used.contains(n.output[0].as_str())
            })
            .map(|(ix, _)| ix)
            .collect();
        if dead.is_empty() {
            break;
        }
        for ix in dead.into_iter().rev() {
            let n = graph.node.remove(ix);
            removed.extend(n.output);
        }
    }
    // Shape annotations of tensors that no longer exist would only mislead.
    graph.value_info.retain(|v| !removed.contains(&v.name));

    matches.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{
        tensor_proto::DataType, tensor_shape_proto, type_proto, TensorProto, TensorShapeProto,
        TypeProto, ValueInfoProto,
    };
    use tract_onnx::prelude::*;

    const ROWS: usize = 5;
    const DIM: usize = 3;

    fn quantized_table() -> Vec<i8> {
        (0..ROWS * DIM)
            .map(|i| ((i * 37) % 255) as i32 - 127)
            .map(|v| v as i8)
            .collect()
    }

    fn int8_initializer(name: &str, dims: &[i64], data: &[i8]) -> TensorProto {
        TensorProto {
            name: name.to_owned(),
            dims: dims.to_vec(),
            data_type: DataType::Int8 as i32,
            raw_data: data.iter().map(|v| *v as u8).collect(),
            ..TensorProto::default()
        }
    }

    fn f32_initializer(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
        TensorProto {
            name: name.to_owned(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            float_data: data.to_vec(),
            ..TensorProto::default()
        }
    }

    fn value_info(name: &str, elem_type: DataType, dims: &[&str]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: Some(match d.parse::<i64>() {
                    Ok(v) => tensor_shape_proto::dimension::Value::DimValue(v),
                    Err(_) => tensor_shape_proto::dimension::Value::DimParam((*d).to_owned()),
                }),
                ..Default::default()
            })
            .collect();
        ValueInfoProto {
            name: name.to_owned(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: elem_type as i32,
                    shape: Some(TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn attr_int(name: &str, i: i64) -> AttributeProto {
        AttributeProto {
            name: name.to_owned(),
            r#type: AttributeType::Int as i32,
            i,
            ..Default::default()
        }
    }

    /// `emb = Gather(Mul(Cast(q), scale), ids)` with the given scale; `mul_first`
    /// swaps the Mul operands.
    fn model(scale: TensorProto, mul_first: bool) -> ModelProto {
        let mul_inputs = if mul_first {
            vec!["scale".to_owned(), "table_f".to_owned()]
        } else {
            vec!["table_f".to_owned(), "scale".to_owned()]
        };
        let graph = GraphProto {
            name: "tiny".to_owned(),
            node: vec![
                node(
                    "Cast",
                    "cast".into(),
                    vec!["q".into()],
                    "table_f".into(),
                    vec![attr_int("to", DataType::Float as i64)],
                ),
                node("Mul", "mul".into(), mul_inputs, "table".into(), vec![]),
                node(
                    "Gather",
                    "gather".into(),
                    vec!["table".into(), "ids".into()],
                    "emb".into(),
                    vec![attr_int("axis", 0)],
                ),
            ],
            initializer: vec![
                int8_initializer("q", &[ROWS as i64, DIM as i64], &quantized_table()),
                scale,
            ],
            input: vec![value_info("ids", DataType::Int64, &["batch", "seq"])],
            output: vec![value_info("emb", DataType::Float, &["batch", "seq", "3"])],
            value_info: vec![value_info("table", DataType::Float, &["5", "3"])],
            ..GraphProto::default()
        };
        ModelProto {
            ir_version: 8,
            opset_import: vec![tract_onnx::pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(graph),
            ..ModelProto::default()
        }
    }

    fn row_scale() -> TensorProto {
        f32_initializer("scale", &[ROWS as i64, 1], &[0.5, 0.25, 2.0, 0.125, 1.5])
    }

    fn op_types(model: &ModelProto) -> Vec<&str> {
        model
            .graph
            .as_ref()
            .expect("graph")
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .collect()
    }

    /// Runs the model (all graph outputs) on ids of shape [2, 3].
    fn run(model: &ModelProto) -> TVec<TValue> {
        let plan = tract_onnx::onnx()
            .model_for_proto_model(model)
            .expect("parse")
            .into_optimized()
            .expect("optimize")
            .into_runnable()
            .expect("plan");
        let ids = Tensor::from_shape::<i64>(&[2, 3], &[4, 0, 2, 2, 1, 3]).expect("ids");
        plan.run(tvec![ids.into_tvalue()]).expect("run")
    }

    fn assert_same_outputs(a: &ModelProto, b: &ModelProto) {
        let (ra, rb) = (run(a), run(b));
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb.iter()) {
            // Same f32 products in both graphs: equal bit for bit.
            assert_eq!(x.shape(), y.shape());
            assert_eq!(
                x.to_plain_array_view::<f32>().expect("f32"),
                y.to_plain_array_view::<f32>().expect("f32")
            );
        }
    }

    #[test]
    fn per_row_scale_is_gathered_and_table_nodes_dropped() {
        let original = model(row_scale(), false);
        let mut rewritten = original.clone();
        assert_eq!(gather_before_dequantize(&mut rewritten), 1);
        assert_eq!(op_types(&rewritten), ["Gather", "Cast", "Gather", "Mul"]);
        let graph = rewritten.graph.as_ref().expect("graph");
        let last = graph.node.last().expect("nodes");
        assert_eq!(
            last.output,
            ["emb"],
            "the rewrite must keep the Gather's output name"
        );
        assert_eq!(graph.node[0].input, ["q", "ids"]);
        assert_eq!(graph.node[2].input, ["scale", "ids"]);
        assert!(
            graph.value_info.is_empty(),
            "value_info of the dropped table is removed"
        );
        assert_same_outputs(&original, &rewritten);

        // And the values are the dequantized rows.
        let out = run(&rewritten);
        let out = out[0].to_plain_array_view::<f32>().expect("f32");
        let q = quantized_table();
        let scale = [0.5f32, 0.25, 2.0, 0.125, 1.5];
        for (pos, id) in [4usize, 0, 2, 2, 1, 3].iter().enumerate() {
            for j in 0..DIM {
                assert_eq!(
                    out[[pos / 3, pos % 3, j]],
                    q[id * DIM + j] as f32 * scale[*id]
                );
            }
        }
    }

    #[test]
    fn operand_order_of_mul_does_not_matter() {
        let original = model(row_scale(), true);
        let mut rewritten = original.clone();
        assert_eq!(gather_before_dequantize(&mut rewritten), 1);
        assert_same_outputs(&original, &rewritten);
    }

    #[test]
    fn scalar_scale_is_kept_as_is() {
        let original = model(f32_initializer("scale", &[], &[0.03]), false);
        let mut rewritten = original.clone();
        assert_eq!(gather_before_dequantize(&mut rewritten), 1);
        assert_eq!(op_types(&rewritten), ["Gather", "Cast", "Mul"]);
        assert_same_outputs(&original, &rewritten);
    }

    #[test]
    fn per_column_scale_is_kept_as_is() {
        let original = model(
            f32_initializer("scale", &[DIM as i64], &[0.5, 0.1, 3.0]),
            false,
        );
        let mut rewritten = original.clone();
        assert_eq!(gather_before_dequantize(&mut rewritten), 1);
        assert_eq!(op_types(&rewritten), ["Gather", "Cast", "Mul"]);
        assert_same_outputs(&original, &rewritten);
    }

    #[test]
    fn table_still_used_elsewhere_is_kept() {
        let mut original = model(row_scale(), false);
        let graph = original.graph.as_mut().expect("graph");
        graph
            .output
            .push(value_info("table", DataType::Float, &["5", "3"]));
        let mut rewritten = original.clone();
        assert_eq!(gather_before_dequantize(&mut rewritten), 1);
        assert_eq!(
            op_types(&rewritten),
            ["Cast", "Mul", "Gather", "Cast", "Gather", "Mul"]
        );
        assert_same_outputs(&original, &rewritten);
    }

    #[test]
    fn graphs_without_the_pattern_are_untouched() {
        // Plain f32 embedding table (the fp32 export).
        let mut plain = model(row_scale(), false);
        {
            let graph = plain.graph.as_mut().expect("graph");
            graph.node.drain(0..2);
            graph.node[0].input[0] = "scale".into();
        }
        let before = plain.clone();
        assert_eq!(gather_before_dequantize(&mut plain), 0);
        assert_eq!(plain, before);

        // Gather along another axis.
        let mut axis1 = model(row_scale(), false);
        axis1.graph.as_mut().expect("graph").node[2].attribute = vec![attr_int("axis", 1)];
        let before = axis1.clone();
        assert_eq!(gather_before_dequantize(&mut axis1), 0);
        assert_eq!(axis1, before);

        // A scale with the table's rank but a single row: not rewritten.
        let mut single_row = model(
            f32_initializer("scale", &[1, DIM as i64], &[0.5, 0.1, 3.0]),
            false,
        );
        let before = single_row.clone();
        assert_eq!(gather_before_dequantize(&mut single_row), 0);
        assert_eq!(single_row, before);

        // A scale that would enlarge the table by broadcasting.
        let mut wide = model(
            f32_initializer("scale", &[ROWS as i64, 2], &[1.0; 10]),
            false,
        );
        let before = wide.clone();
        assert_eq!(gather_before_dequantize(&mut wide), 0);
        assert_eq!(wide, before);

        assert_eq!(gather_before_dequantize(&mut ModelProto::default()), 0);
    }

    #[test]
    fn fresh_names_avoid_collisions() {
        let mut original = model(row_scale(), false);
        // Occupy the name the rewrite would pick first.
        original
            .graph
            .as_mut()
            .expect("graph")
            .initializer
            .push(f32_initializer("emb/rows_float", &[1], &[0.0]));
        let mut rewritten = original.clone();
        assert_eq!(gather_before_dequantize(&mut rewritten), 1);
        let graph = rewritten.graph.as_ref().expect("graph");
        assert_eq!(graph.node[1].output, ["emb/rows_float_1"]);
        assert_same_outputs(&original, &rewritten);
    }
}
