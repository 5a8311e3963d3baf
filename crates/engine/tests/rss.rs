//! RSS stays bounded over many distinct input shapes: the engine runs one
//! plan with symbolic batch/sequence dims. A plan per concrete shape would
//! hold a copy of the weights per shape and grow by hundreds of MB here.
//!
//! Alone in its own test binary, so no other test allocates in this process
//! while it measures.

mod common;

use common::{load, rss_bytes, L3_MODEL};

/// Growth allowed over the run, after warm-up (measured: a few MB). A plan per
/// shape holds its own copy of the weights and would pass this within a
/// handful of shapes.
const MAX_GROWTH_BYTES: u64 = 40 << 20;

#[test]
fn rss_is_bounded_over_many_shapes() {
    // The fp32 L3 model: the plan logic is the model's, and this one runs
    // fastest in a debug build.
    let engine = load(L3_MODEL);
    let words = [
        "memory",
        "worker",
        "supervisor",
        "socket",
        "request",
        "embedding",
        "model",
        "signal",
        "restart",
        "pool",
        "kernel",
        "limit",
        "queue",
        "deadline",
        "vector",
    ];
    let text = |n: usize| -> String {
        (0..n)
            .map(|i| words[(i * 7 + n) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Warm-up: the largest shapes first, so the allocator has seen the peak.
    for n in [254, 200, 128, 1] {
        engine.embed(&[text(n), text(n / 2 + 1)]).expect("warm-up");
    }
    let before = rss_bytes();

    let mut max_growth = 0;
    for i in 0..300usize {
        // Sequence lengths 3 to 256 tokens (1 to 254 words), batch sizes 1
        // and 2: ~300 distinct [batch, seq] shapes.
        let n = 1 + (i * 37) % 254;
        let batch: Vec<String> = (0..1 + i % 2)
            .map(|k| text(n.saturating_sub(k * 3).max(1)))
            .collect();
        engine.embed(&batch).expect("embed");
        max_growth = max_growth.max(rss_bytes().saturating_sub(before));
    }
    let after = rss_bytes();
    eprintln!(
        "RSS before {} MB, after {} MB, max growth {} MB over 300 shapes",
        before >> 20,
        after >> 20,
        max_growth >> 20
    );
    assert!(
        max_growth < MAX_GROWTH_BYTES,
        "RSS grew by {} MB over 300 input shapes (limit {} MB): is a plan built per shape?",
        max_growth >> 20,
        MAX_GROWTH_BYTES >> 20
    );
}
