//! Load-time rewrites of tract's graph where tract alone leaves a
//! transformer slow: fusions of elementwise chains, flat elementwise ops, and
//! the split of long matrix products.
//!
//! With the batch and sequence dims symbolic, tract cannot prove that
//! `[batch, seq, 1536] × [1, 1, 1]` or `[batch, 12, seq, seq] + [batch, 1, 1,
//! seq]` is worth its vectorised kernels (its prover does not bound a product
//! of two symbols), so every such `Mul`/`Add` runs element by element through
//! a generic broadcasting loop, ~4.5 ns per element: a third of a 242-token
//! run of all-MiniLM-L6-v2 (`examples/engine_profile`). On the decluttered
//! graph, before tract's codegen:
//!
//! * **GELU**, `x · 0.5 · (1 + erf(x / √2))`, five nodes over `[batch, seq,
//!   1536]`. tract fuses it into its vectorised `GeluExact` only when the
//!   `0.5` multiplies `x` first or last; the all-MiniLM-L6-v2 export
//!   multiplies it into `(1 + erf)` first. [`fuse_gelu`] matches every order
//!   and wires tract's own `GeluExact`.
//! * **Attention softmax**, `softmax(scores [· scale] + mask)` over `[batch,
//!   heads, seq, seq]`, optionally followed by `where(isnan(p), 0, p)` (newer
//!   PyTorch exports). [`fuse_masked_softmax`] replaces the chain with one
//!   [`MaskedSoftmax`] op that adds the broadcast mask row by row in place,
//!   runs tract's own softmax kernel on the result and zeroes NaNs in the
//!   same buffer.
//! * **Long products** (k = 1536, the feed-forward down projection):
//!   [`split_long_products`] runs them as two products over the halves of k,
//!   summed, which tract's kernels run ~40% faster.
//!
//! On the optimized graph, [`flatten_binaries`] runs every f32 `Add`, `Sub`,
//! `Mul` and `Div` left (generic, or placed by codegen on kernels that fall
//! back to the generic loop for a size-1 axis with an odd stride) as a flat
//! loop ([`FlatBinary`]).
//!
//! All compute what the graph computes, in the same order of operations per
//! element, up to the association of the GELU product and of the split sums:
//! the fixture tests hold the embeddings within 1e-4 of onnxruntime
//! (measured: ~3e-7). `tests/fusions.rs` checks that each fires on both
//! shipped models, so a tract upgrade that changes the graph fails loudly.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::math::{Add, Erf, IsNan, Mul};
use tract_onnx::tract_core::ops::nn::{gelu_exact::gelu_exact, Softmax, SoftmaxKind};

/// The scalar value of a constant outlet (any shape of one element), as f32.
fn scalar_const(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    let konst = model.outlet_fact(outlet).ok()?.konst.as_ref()?;
    if konst.len() != 1 {
        return None;
    }
    konst.cast_to_scalar::<f32>().ok()
}

/// Whether `outlet` holds the constant `value` (to f32 rounding).
fn is_const(model: &TypedModel, outlet: OutletId, value: f32) -> bool {
    scalar_const(model, outlet).is_some_and(|v| (v - value).abs() <= 1e-6 * value.abs())
}

/// `node` as a binary op of kind `B`, with its two inputs.
fn bin<B: BinMiniOp>(node: &TypedNode) -> Option<(OutletId, OutletId)> {
    let op = node.op_as::<TypedBinOp>()?;
    (op.0.is::<B>() && node.inputs.len() == 2).then(|| (node.inputs[0], node.inputs[1]))
}

/// The one node reading `node`'s only output, if exactly one does.
fn only_reader<'m>(model: &'m TypedModel, node: &TypedNode) -> Option<&'m TypedNode> {
    model.single_succ(node.id).ok().flatten()
}

/// The input of a binary `node` other than `one`, if `one` is an input.
fn other(inputs: (OutletId, OutletId), one: OutletId) -> Option<OutletId> {
    match inputs {
        (a, b) if a == one => Some(b),
        (a, b) if b == one => Some(a),
        _ => None,
    }
}

/// Replaces every exact-GELU chain by tract's `GeluExact`; returns how many.
pub(crate) fn fuse_gelu(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    while let Some((x, last)) = find_gelu(model) {
        let mut patch = TypedModelPatch::default();
        let tap = patch.tap_model(model, x)?;
        let name = format!("{}.gelu", model.node(last).name);
        let wired = patch.wire_node(name, gelu_exact(), &[tap])?;
        patch.shunt_outside(model, last.into(), wired[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// The input `x` and the last node of the first GELU chain in `model`.
fn find_gelu(model: &TypedModel) -> Option<(OutletId, usize)> {
    model.nodes().iter().find_map(|erf| {
        let op = erf.op_as::<ElementWiseOp>()?;
        if !op.0.is::<Erf>()
            || model.outlet_fact(erf.id.into()).ok()?.datum_type != f32::datum_type()
        {
            return None;
        }
        // erf(x · 1/√2): tract turns the export's division by √2 into this.
        let scaled = model.node(erf.inputs[0].node);
        let (a, b) = bin::<Mul>(scaled)?;
        let inv_sqrt2 = std::f32::consts::FRAC_1_SQRT_2;
        let x = match (is_const(model, a, inv_sqrt2), is_const(model, b, inv_sqrt2)) {
            (false, true) => a,
            (true, false) => b,
            _ => return None,
        };
        // 1 + erf(..)
        let one_plus = only_reader(model, erf)?;
        let rest = other(bin::<Add>(one_plus)?, erf.id.into())?;
        if !is_const(model, rest, 1.0) {
            return None;
        }
        // Then · x and · 0.5, in any order: (1+erf)·0.5·x, (1+erf)·x·0.5,
        // or (1+erf)·(x·0.5).
        let first = only_reader(model, one_plus)?;
        let with = other(bin::<Mul>(first)?, one_plus.id.into())?;
        let last = if with == x {
            let second = only_reader(model, first)?;
            is_const(model, other(bin::<Mul>(second)?, first.id.into())?, 0.5).then_some(second)?
        } else if is_const(model, with, 0.5) {
            let second = only_reader(model, first)?;
            (other(bin::<Mul>(second)?, first.id.into())? == x).then_some(second)?
        } else {
            let half_x = model.node(with.node);
            let (a, b) = bin::<Mul>(half_x)?;
            let half = other((a, b), x)?;
            (is_const(model, half, 0.5) && model.single_succ(half_x.id).ok()?.is_some())
                .then_some(first)?
        };
        Some((x, last.id))
    })
}

/// Replaces every `softmax(scores [· scale] + mask)` over the last axis,
/// with its optional `where(isnan(p), 0, p)`, by [`MaskedSoftmax`]; returns
/// how many.
pub(crate) fn fuse_masked_softmax(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    while let Some(found) = find_masked_softmax(model) {
        let mut patch = TypedModelPatch::default();
        let scores = patch.tap_model(model, found.scores)?;
        let mask = patch.tap_model(model, found.mask)?;
        let name = format!("{}.masked", model.node(found.softmax).name);
        let wired = patch.wire_node(name, found.op, &[scores, mask])?;
        patch.shunt_outside(model, found.last.into(), wired[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// One matched attention softmax chain.
struct SoftmaxChain {
    scores: OutletId,
    mask: OutletId,
    softmax: usize,
    /// The node whose output the fused op replaces.
    last: usize,
    op: MaskedSoftmax,
}

fn find_masked_softmax(model: &TypedModel) -> Option<SoftmaxChain> {
    model.nodes().iter().find_map(|node| {
        let softmax = node.op_as::<Softmax>()?;
        let fact = model.outlet_fact(node.id.into()).ok()?;
        let rank = fact.rank();
        if fact.datum_type != f32::datum_type()
            || softmax.kind != SoftmaxKind::Softmax
            || softmax.quant_output_dt.is_some()
            || *softmax.axes != [rank - 1]
        {
            return None;
        }
        let add = model.node(node.inputs[0].node);
        let (a, b) = bin::<Add>(add)?;
        if model.single_succ(add.id).ok()?.map(|n| n.id) != Some(node.id) {
            return None;
        }
        // The scores have the output's shape; the mask broadcasts into it
        // (every dim 1 or equal) and is whole along the softmax axis.
        let shape_of = |o: OutletId| model.outlet_fact(o).ok().map(|f| f.shape.to_tvec());
        let out_shape = fact.shape.to_tvec();
        let broadcasts_in = |o: OutletId| {
            shape_of(o).is_some_and(|s| {
                s.len() == rank
                    && s.iter().zip(&out_shape).all(|(d, o)| d.is_one() || d == o)
                    && s[rank - 1] == out_shape[rank - 1]
                    && model
                        .outlet_fact(o)
                        .is_ok_and(|f| f.datum_type == f32::datum_type())
            })
        };
        let (scores, mask) = if shape_of(a)? == out_shape && broadcasts_in(b) {
            (a, b)
        } else if shape_of(b)? == out_shape && broadcasts_in(a) {
            (b, a)
        } else {
            return None;
        };
        // An optional scale by a constant just before, read by nothing else.
        let (scores, scale) = match bin::<Mul>(model.node(scores.node)) {
            Some((x, c)) if model.single_succ(scores.node).ok()?.is_some() => {
                match (scalar_const(model, c), scalar_const(model, x)) {
                    (Some(s), None) if shape_of(x)? == out_shape => (x, Some(s)),
                    (None, Some(s)) if shape_of(c)? == out_shape => (c, Some(s)),
                    _ => (scores, None),
                }
            }
            _ => (scores, None),
        };
        // An optional `where(isnan(p), 0, p)` right after: both nodes read p,
        // and nothing else does.
        let readers: Vec<&TypedNode> = node.outputs[0]
            .successors
            .iter()
            .map(|i| model.node(i.node))
            .collect();
        let nan_guard = match readers.as_slice() {
            [x, y] => {
                let (is_nan, iff) = if x.op_is::<Iff>() { (y, x) } else { (x, y) };
                let guarded = is_nan
                    .op_as::<ElementWiseOp>()
                    .is_some_and(|op| op.0.is::<IsNan>())
                    && iff.op_is::<Iff>()
                    && iff.inputs.len() == 3
                    && iff.inputs[0] == OutletId::new(is_nan.id, 0)
                    && is_const(model, iff.inputs[1], 0.0)
                    && iff.inputs[2] == OutletId::new(node.id, 0)
                    && model.single_succ(is_nan.id).ok()?.map(|n| n.id) == Some(iff.id);
                guarded.then_some(iff.id)
            }
            _ => None,
        };
        Some(SoftmaxChain {
            scores,
            mask,
            softmax: node.id,
            last: nan_guard.unwrap_or(node.id),
            op: MaskedSoftmax {
                scale,
                softmax: softmax.clone(),
                nan_to_zero: nan_guard.is_some(),
            },
        })
    })
}

/// `softmax(scores · scale + mask)` over the last axis, the mask broadcast
/// along any other axis, NaNs optionally replaced by 0: an attention
/// softmax in one pass over one buffer (f32 only).
#[derive(Debug, Clone)]
pub struct MaskedSoftmax {
    /// Multiplies the scores before the mask is added, if any.
    scale: Option<f32>,
    /// tract's own softmax op from the graph, which does the exponentials
    /// with its vectorised kernel.
    softmax: Softmax,
    /// Whether the graph then replaced NaN probabilities by 0.
    nan_to_zero: bool,
}

impl PartialEq for MaskedSoftmax {
    fn eq(&self, other: &Self) -> bool {
        self.scale.map(f32::to_bits) == other.scale.map(f32::to_bits)
            && self.softmax == other.softmax
            && self.nan_to_zero == other.nan_to_zero
    }
}

impl Eq for MaskedSoftmax {}

/// The name the fused op has in the plan (and in profiles).
pub(crate) const MASKED_SOFTMAX: &str = "InferdMaskedSoftmax";

impl Op for MaskedSoftmax {
    fn name(&self) -> StaticName {
        MASKED_SOFTMAX.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "scale: {:?}, nan_to_zero: {}",
            self.scale, self.nan_to_zero
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for MaskedSoftmax {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (scores, mask) = args_2!(inputs);
        let mut scores = scores.into_tensor();
        add_mask(&mut scores, &mask, self.scale)?;
        let mut probs = self
            .softmax
            .eval(ctx, tvec!(scores.into_tvalue()))?
            .remove(0)
            .into_tensor();
        if self.nan_to_zero {
            // A store on every element, not only on NaNs: branch-free, so the
            // loop vectorises.
            for p in probs.view_mut().as_slice_mut::<f32>()? {
                *p = if p.is_nan() { 0.0 } else { *p };
            }
        }
        Ok(tvec!(probs.into_tvalue()))
    }
}

impl TypedOp for MaskedSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// `scores = scores · scale + mask`, in place, the mask broadcast along every
/// axis where it has size 1 (it is whole along the last one).
fn add_mask(scores: &mut Tensor, mask: &Tensor, scale: Option<f32>) -> TractResult<()> {
    let shape = scores.shape().to_vec();
    let mask_shape = mask.shape().to_vec();
    let rank = shape.len();
    ensure!(rank >= 1 && mask_shape.len() == rank && mask_shape[rank - 1] == shape[rank - 1]);
    ensure!(shape
        .iter()
        .zip(&mask_shape)
        .all(|(s, m)| *m == 1 || m == s));
    let row = shape[rank - 1];
    if row == 0 {
        return Ok(());
    }
    let mask_view = mask.view();
    let mask = mask_view.as_slice::<f32>()?;
    // The mask row each score row reads, as a stride per outer axis (0 where
    // the mask broadcasts).
    let mut strides = vec![0usize; rank - 1];
    let mut stride = 1;
    for axis in (0..rank - 1).rev() {
        if mask_shape[axis] != 1 {
            strides[axis] = stride;
        }
        stride *= mask_shape[axis];
    }
    let outer = &shape[..rank - 1];
    let mut index = vec![0usize; rank - 1];
    let mut scores_view = scores.view_mut();
    for scores_row in scores_view.as_slice_mut::<f32>()?.chunks_exact_mut(row) {
        let mask_row: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        let mask_row = &mask[mask_row * row..][..row];
        match scale {
            Some(scale) => scores_row
                .iter_mut()
                .zip(mask_row)
                .for_each(|(s, m)| *s = *s * scale + m),
            None => scores_row
                .iter_mut()
                .zip(mask_row)
                .for_each(|(s, m)| *s += m),
        }
        // Next outer index, last axis fastest.
        for axis in (0..outer.len()).rev() {
            index[axis] += 1;
            if index[axis] < outer[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(())
}

/// Contractions longer than this are split in two (see [`split_long_products`]).
const MAX_UNSPLIT_K: usize = 1024;

/// Splits every f32 product of an activation by a constant weight whose
/// contracted dim is over [`MAX_UNSPLIT_K`] into two products over the two
/// halves of that dim, summed: `x·W = x[.., :k/2]·W[:k/2] + x[.., k/2:]·W[k/2:]`.
/// Returns how many were split.
///
/// tract's kernels stream the whole packed weight panel for every few
/// columns of output; with k = 1536 (a BERT feed-forward's down projection)
/// that panel is 384 KiB and the product runs at ~117 GFLOP/s on the
/// development machine, against ~155 for the same FLOPs with k = 384
/// (`examples/engine_profile`). Two halves run ~25% faster even with the
/// slices and the add. The sum is reassociated, so results move by float
/// rounding only (~1e-7).
pub(crate) fn split_long_products(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::array::Slice;
    let mut split = 0;
    for id in model.eval_order()? {
        let Some(LongProduct {
            op,
            name,
            activation,
            weight_ix,
            weight,
            weight_axis,
            activation_axis,
        }) = long_product(model, id)?
        else {
            continue;
        };
        let k = weight.shape()[weight_axis];
        let half = k / 2;
        let mut patch = TypedModelPatch::default();
        let activation = patch.tap_model(model, activation)?;
        let mut halves = vec![];
        for (part, (start, end)) in [(0, half), (half, k)].into_iter().enumerate() {
            let w = patch.add_const(
                format!("{name}.w{part}"),
                weight.slice(weight_axis, start, end)?,
            )?;
            let x = patch.wire_node(
                format!("{name}.x{part}"),
                Slice::new(activation_axis, start, end),
                &[activation],
            )?[0];
            let mut inputs = [x, x];
            inputs[weight_ix] = w;
            halves.push(patch.wire_node(format!("{name}.k{part}"), op.clone(), &inputs)?[0]);
        }
        let sum = patch.wire_node(
            format!("{name}.sum"),
            tract_onnx::tract_core::ops::math::add(),
            &halves,
        )?[0];
        patch.shunt_outside(model, id.into(), sum)?;
        patch.apply(model)?;
        split += 1;
    }
    if split > 0 {
        model.compact()?;
    }
    Ok(split)
}

/// A product [`split_long_products`] splits, with what it needs once the
/// model is borrowed mutably.
struct LongProduct {
    op: tract_onnx::tract_core::ops::einsum::EinSum,
    /// The node's name, for the new nodes' names.
    name: String,
    /// The activation input.
    activation: OutletId,
    /// Which input (0 or 1) is the weight.
    weight_ix: usize,
    weight: Arc<Tensor>,
    /// The contracted axis in the weight and in the activation.
    weight_axis: usize,
    activation_axis: usize,
}

/// Node `id` as a [`LongProduct`] if it is an f32 product of an activation
/// by a constant weight over one contracted axis longer than
/// [`MAX_UNSPLIT_K`] (and even).
fn long_product(model: &TypedModel, id: usize) -> TractResult<Option<LongProduct>> {
    use tract_onnx::tract_core::ops::einsum::EinSum;
    let node = model.node(id);
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let Some(weight_ix) =
        (0..2).find(|&i| facts[i].konst.is_some() && facts[1 - i].konst.is_none())
    else {
        return Ok(None);
    };
    let weight = facts[weight_ix].konst.clone().expect("checked above");
    if weight.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    // The one axis both inputs have and the output has not.
    let contracted: Vec<_> = op
        .axes
        .iter_all_axes()
        .filter(|a| a.outputs[0].is_empty() && a.inputs[0].len() == 1 && a.inputs[1].len() == 1)
        .collect();
    let [axis] = contracted.as_slice() else {
        return Ok(None);
    };
    let (weight_axis, activation_axis) = (axis.inputs[weight_ix][0], axis.inputs[1 - weight_ix][0]);
    let k = weight.shape()[weight_axis];
    if k <= MAX_UNSPLIT_K || k % 2 != 0 {
        return Ok(None);
    }
    Ok(Some(LongProduct {
        op: op.clone(),
        name: node.name.clone(),
        activation: node.inputs[1 - weight_ix],
        weight_ix,
        weight,
        weight_axis,
        activation_axis,
    }))
}

/// Replaces every f32 `Add`, `Sub`, `Mul` and `Div` of the optimized graph,
/// generic or placed by tract's codegen (`OptBinByScalar`, `OptBinUnicast`,
/// `OptBinChain`), by [`FlatBinary`] nodes; returns how many nodes were
/// replaced.
///
/// Two reasons: tract leaves the generic ones generic (module docs), and
/// its placed ones fall back to the same generic loop whenever a tensor's
/// strides are not exactly the natural ones, which tract's own reshapes
/// cause for a leading axis of size 1 (`[1, 242, 384]` with strides `[384,
/// 384, 1]`): every layer norm and residual add of a one-text batch.
pub(crate) fn flatten_binaries(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::{OptBinByScalar, OptBinChain, OptBinUnicast};
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let steps: Vec<Box<dyn BinMiniOp>> = if let Some(op) = node.op_as::<TypedBinOp>() {
            if op.1.is_some() {
                continue;
            }
            vec![op.0.clone()]
        } else if let Some(op) = node.op_as::<OptBinByScalar>() {
            vec![op.binop.clone()]
        } else if let Some(op) = node.op_as::<OptBinUnicast>() {
            vec![op.binop.clone()]
        } else if let Some(op) = node.op_as::<OptBinChain>() {
            op.steps.iter().map(|step| step.binop.clone()).collect()
        } else {
            continue;
        };
        let all_f32 = node.inputs.len() == steps.len() + 1
            && model
                .node_input_facts(id)?
                .iter()
                .all(|f| f.datum_type == f32::datum_type())
            && model.outlet_fact(id.into())?.datum_type == f32::datum_type();
        let Some(kinds) = steps
            .iter()
            .map(|mini| BinaryKind::of(mini.as_ref()))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        if !all_f32 {
            continue;
        }
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(model, &node.inputs)?;
        let mut acc = taps[0];
        for (ix, (kind, mini)) in kinds.into_iter().zip(steps).enumerate() {
            let name = if ix == 0 {
                node.name.clone()
            } else {
                format!("{}.{ix}", node.name)
            };
            let flat = FlatBinary {
                kind,
                generic: TypedBinOp(mini, None),
            };
            acc = patch.wire_node(name, flat, &[acc, taps[ix + 1]])?[0];
        }
        patch.shunt_outside(model, id.into(), acc)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The binary ops [`FlatBinary`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryKind {
    fn of(mini: &dyn BinMiniOp) -> Option<BinaryKind> {
        use tract_onnx::tract_core::ops::math::{Div, Sub};
        if mini.is::<Add>() {
            Some(BinaryKind::Add)
        } else if mini.is::<Sub>() {
            Some(BinaryKind::Sub)
        } else if mini.is::<Mul>() {
            Some(BinaryKind::Mul)
        } else if mini.is::<Div>() {
            Some(BinaryKind::Div)
        } else {
            None
        }
    }

    /// `x op y`, or `y op x` when `swapped`.
    #[inline(always)]
    fn run(self, x: f32, y: f32, swapped: bool) -> f32 {
        let (x, y) = if swapped { (y, x) } else { (x, y) };
        match self {
            BinaryKind::Add => x + y,
            BinaryKind::Sub => x - y,
            BinaryKind::Mul => x * y,
            BinaryKind::Div => x / y,
        }
    }

    /// `full[i] = full[i] op small[i % small.len()]` (`small op full` when
    /// `swapped`): `small` repeats along `full`.
    fn repeated(self, full: &mut [f32], small: &[f32], swapped: bool) {
        macro_rules! go {
            ($swapped:expr) => {
                if small.len() == 1 {
                    let y = small[0];
                    full.iter_mut().for_each(|x| *x = self.run(*x, y, $swapped));
                } else {
                    for chunk in full.chunks_exact_mut(small.len()) {
                        for (x, y) in chunk.iter_mut().zip(small) {
                            *x = self.run(*x, *y, $swapped);
                        }
                    }
                }
            };
        }
        // Two monomorphic loops, so each vectorises without a branch inside.
        if swapped {
            go!(true)
        } else {
            go!(false)
        }
    }

    /// `full[block i] = full[block i] op small[i]`: one value per block of
    /// `full.len() / small.len()` elements.
    fn per_block(self, full: &mut [f32], small: &[f32], swapped: bool) {
        let period = full.len() / small.len();
        for (block, y) in full.chunks_exact_mut(period).zip(small) {
            if swapped {
                block.iter_mut().for_each(|x| *x = self.run(*x, *y, true));
            } else {
                block.iter_mut().for_each(|x| *x = self.run(*x, *y, false));
            }
        }
    }
}

/// An f32 `Add`/`Sub`/`Mul`/`Div` that runs as one flat loop when one
/// operand has the output's shape and the other is a single value, repeats
/// along it (its leading dims 1, its trailing dims the output's: biases,
/// layer norm weights) or holds one value per block (its leading dims the
/// output's, its trailing dims 1: layer norm statistics). Any other
/// broadcast goes to tract's generic op, which it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatBinary {
    kind: BinaryKind,
    generic: TypedBinOp,
}

/// How the smaller operand lines up with the one of the output's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Repeated,
    PerBlock,
}

/// How `small` lines up with `full`, if flatly.
fn layout(full: &[usize], small: &[usize]) -> Option<Layout> {
    if full.len() != small.len() {
        return None;
    }
    let trailing_equal = small
        .iter()
        .zip(full)
        .skip_while(|(s, _)| **s == 1)
        .all(|(s, f)| s == f);
    if trailing_equal {
        return Some(Layout::Repeated);
    }
    let ones_from = small.iter().rposition(|s| *s != 1).map_or(0, |i| i + 1);
    (small[..ones_from] == full[..ones_from]).then_some(Layout::PerBlock)
}

/// Whether `t` is f32 and its elements lie in C order with no gaps (the
/// stride of a size-1 axis does not matter).
fn flat_f32(t: &Tensor) -> bool {
    let mut expected = 1;
    for (dim, stride) in t.shape().iter().zip(t.strides()).rev() {
        if *dim != 1 && *stride != expected as isize {
            return false;
        }
        expected *= dim;
    }
    t.datum_type() == f32::datum_type() && t.len() == expected
}

impl Op for FlatBinary {
    fn name(&self) -> StaticName {
        format!("InferdFlat{:?}", self.kind).into()
    }

    op_as_typed_op!();
}

impl EvalOp for FlatBinary {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a_shape, b_shape) = (inputs[0].shape().to_vec(), inputs[1].shape().to_vec());
        if !inputs.iter().all(|t| flat_f32(t)) || inputs.iter().any(|t| t.len() == 0) {
            return self.generic.eval(ctx, inputs);
        }
        // The output has a's shape (b broadcasts into it), or b's if the op
        // can run with the operands swapped.
        let (full_first, small_layout) =
            match (layout(&a_shape, &b_shape), layout(&b_shape, &a_shape)) {
                (Some(l), _) => (true, l),
                (None, Some(l)) => (false, l),
                (None, None) => return self.generic.eval(ctx, inputs),
            };
        let (a, b) = args_2!(inputs);
        let (full, small, swapped) = if full_first {
            (a, b, false)
        } else {
            (b, a, true)
        };
        let mut full = full.into_tensor();
        {
            let mut view = full.view_mut();
            let out = view.as_slice_mut::<f32>()?;
            let small_view = small.view();
            let small = small_view.as_slice::<f32>()?;
            match small_layout {
                Layout::Repeated => self.kind.repeated(out, small, swapped),
                Layout::PerBlock => self.kind.per_block(out, small, swapped),
            }
        }
        // Keep the shape the op's facts promise (a's and b's broadcast).
        Ok(tvec!(full.into_tvalue()))
    }
}

impl TypedOp for FlatBinary {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.generic.output_facts(inputs)
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_of_the_smaller_operand() {
        assert_eq!(layout(&[2, 3, 4], &[2, 3, 4]), Some(Layout::Repeated));
        assert_eq!(layout(&[2, 3, 4], &[1, 1, 4]), Some(Layout::Repeated));
        assert_eq!(layout(&[2, 3, 4], &[1, 1, 1]), Some(Layout::Repeated));
        assert_eq!(layout(&[2, 3, 4], &[2, 3, 1]), Some(Layout::PerBlock));
        assert_eq!(layout(&[2, 3, 4], &[2, 1, 1]), Some(Layout::PerBlock));
        // Broadcast in the middle, or a different rank: not flat.
        assert_eq!(layout(&[2, 3, 4], &[2, 1, 4]), None);
        assert_eq!(layout(&[2, 3, 4], &[3, 4]), None);
    }

    #[test]
    fn a_size_one_axis_may_have_any_stride() {
        let t = Tensor::from_shape(&[1, 2, 3], &[0f32; 6]).expect("shape");
        assert!(flat_f32(&t));
        let t = Tensor::from_shape(&[1, 2, 3], &[0i64; 6]).expect("shape");
        assert!(!flat_f32(&t), "only f32");
    }

    /// Every layout and operand order against tract's own generic op.
    #[test]
    fn flat_binaries_match_the_generic_op() {
        use tract_onnx::tract_core::ops::math::{Div, Sub};
        let full: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 + 1.0).collect();
        let full = Tensor::from_shape(&[2, 3, 4], &full).expect("shape");
        let smalls = [
            Tensor::from_shape(&[1, 1, 4], &[1.5f32, -2., 3., 0.25]).expect("shape"),
            Tensor::from_shape(&[2, 3, 1], &[1f32, 2., 3., 4., 5., 6.]).expect("shape"),
            Tensor::from_shape(&[1, 1, 1], &[7f32]).expect("shape"),
            full.clone(),
        ];
        let minis: [Box<dyn BinMiniOp>; 4] =
            [Box::new(Add), Box::new(Sub), Box::new(Mul), Box::new(Div)];
        for mini in minis {
            let kind = BinaryKind::of(mini.as_ref()).expect("a flat kind");
            let generic = TypedBinOp(mini, None);
            let flat = FlatBinary {
                kind,
                generic: generic.clone(),
            };
            for small in &smalls {
                for (a, b) in [(&full, small), (small, &full)] {
                    let inputs = || tvec!(a.clone().into_tvalue(), b.clone().into_tvalue());
                    let ctx = EvalContext::out_of_plan();
                    let expected = generic.eval(&ctx, inputs()).expect("generic")[0].clone();
                    let got = flat.eval(&ctx, inputs()).expect("flat")[0].clone();
                    assert_eq!(got.shape(), expected.shape(), "{kind:?}");
                    assert_eq!(
                        got.view().as_slice::<f32>().expect("f32"),
                        expected.view().as_slice::<f32>().expect("f32"),
                        "{kind:?} of {:?} and {:?}",
                        a.shape(),
                        b.shape()
                    );
                }
            }
        }
    }

    #[test]
    fn the_mask_broadcasts_along_size_one_axes() {
        let mut scores = Tensor::from_shape(&[2, 2, 3], &[0f32; 12]).expect("shape");
        let mask = Tensor::from_shape(&[2, 1, 3], &[1f32, 2., 3., 10., 20., 30.]).expect("shape");
        add_mask(&mut scores, &mask, Some(2.0)).expect("add");
        assert_eq!(
            scores.view().as_slice::<f32>().expect("f32"),
            [1., 2., 3., 1., 2., 3., 10., 20., 30., 10., 20., 30.]
        );
        let mut scores = Tensor::from_shape(&[2, 3], &[1f32, 1., 1., 2., 2., 2.]).expect("shape");
        let mask = Tensor::from_shape(&[1, 3], &[0f32, -1., -2.]).expect("shape");
        add_mask(&mut scores, &mask, Some(3.0)).expect("add");
        assert_eq!(
            scores.view().as_slice::<f32>().expect("f32"),
            [3., 2., 1., 6., 5., 4.]
        );
    }
}
