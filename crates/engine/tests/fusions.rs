//! The load-time fusions (`src/fuse.rs`) fire on both shipped models: every
//! GELU becomes tract's `GeluExact`, every attention softmax one
//! `InferdMaskedSoftmax`, no elementwise op is left to tract's generic
//! broadcasting loop, and the long feed-forward products are split. A tract upgrade that changes the decluttered graph so
//! that a pattern no longer matches fails here, not silently in a benchmark.

mod common;

use common::{load, INT8_MODEL, L3_MODEL};

#[test]
fn fusions_fire_on_both_models() {
    for (model, layers) in [(INT8_MODEL, 6), (L3_MODEL, 3)] {
        let engine = load(model);
        let ops = engine.plan_ops();
        let count = |op: &str| ops.get(op).copied().unwrap_or(0);
        assert_eq!(count("GeluExact"), layers, "{model}: {ops:?}");
        assert_eq!(count("InferdMaskedSoftmax"), layers, "{model}: {ops:?}");
        // What the fused chains were made of.
        for gone in ["Erf", "Softmax", "IsNan", "Iff"] {
            // The int8 export builds its additive mask with one `Where`
            // (an `Iff` over [batch, 1, 1, seq]): that one stays.
            let allowed = usize::from(gone == "Iff" && model == INT8_MODEL);
            assert!(count(gone) <= allowed, "{model}: {gone} left: {ops:?}");
        }
        // Every f32 Add/Sub/Mul/Div runs flat; none is left generic or to
        // tract's stride-sensitive by-scalar, unicast or chain ops.
        for name in ops.keys() {
            let left = ["Add", "Sub", "Mul", "Div"].contains(&name.as_str())
                || name.starts_with("OptBin")
                || (name.starts_with("Opt")
                    && (name.ends_with("ByScalar") || name.ends_with("Unicast")));
            assert!(!left, "{model}: {name} left unflattened: {ops:?}");
        }
        assert!(count("InferdFlatAdd") >= 2 * layers, "{model}: {ops:?}");
        // The feed-forward down projections (k = 1536) run as two halves.
        let nodes = engine
            .profile(&["a short text".to_owned()], 1)
            .expect("profile");
        let halves = nodes
            .iter()
            .filter(|n| n.op == "OptMatMul" && n.info.contains("k:768"))
            .count();
        assert_eq!(halves, 2 * layers, "{model}: split products");
        assert!(
            !nodes
                .iter()
                .any(|n| n.op == "OptMatMul" && n.info.contains("k:1536")),
            "{model}: a k = 1536 product is left whole"
        );
    }
}
