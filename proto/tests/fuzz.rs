//! Fuzzes every decoder that a peer's bytes reach, and checks that no decode
//! holds more heap at once than the bounds in the crate docs ("Bounds on what
//! a peer's bytes can make a decoder allocate"): per message type, at most
//! [`per_byte`] × payload length + [`constant`] bytes.
//!
//! Inputs come from a seeded xorshift generator: random bytes, and valid
//! encodings of every message type (varied contents) with random mutations
//! (bit flips, varint markers and other interesting bytes, insertions,
//! deletions, truncation, splices of other inputs, huge varint lengths at
//! random offsets). Each input is decoded as every message type, and framed
//! (sometimes with a lying length prefix) and fed through a [`FrameDecoder`]
//! in random pieces. Hand-made worst cases check the bounds where random
//! inputs rarely go.
//!
//! A counting global allocator measures each decode's peak heap. It counts
//! per thread, so the tests of this binary can run in parallel.
//!
//! Knobs: `INFERD_FUZZ_ITERATIONS` (decodes in all, default 1 000 000) and
//! `INFERD_FUZZ_SEED`. A longer run:
//!
//! ```text
//! INFERD_FUZZ_ITERATIONS=200000000 cargo test --release -p inferd-proto --test fuzz -- --nocapture
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Instant;

use bytes::BytesMut;
use inferd_proto::{
    decode_payload, encode_frame, ChaosOptions, ClientMessage, Counters, EmbedResult, ErrorKind,
    ExitKind, ExitRecord, FrameDecoder, Hello, PoolStatus, ProtoError, RecycleReport, RecycleStage,
    RecycleTrigger, RefusalReason, RequestError, RequestLimits, RollReport, RollState,
    ServerMessage, Timing, Token, TokenizeResult, WorkerCommand, WorkerConfig, WorkerEvent,
    WorkerStateKind, WorkerStatus, MAX_TEXTS_PER_REQUEST,
};
use serde::de::DeserializeOwned;

// ---------------------------------------------------------------------------
// Counting allocator

/// `System`, counting the bytes each thread has live and its peak.
struct Counting;

thread_local! {
    /// Bytes this thread allocated and has not freed (it goes negative when
    /// the thread frees what another allocated, which only lowers peaks).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// Highest `LIVE` since the last [`measure`] began.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Adds `delta` to this thread's live bytes; `transient` more are live for
/// a moment (a reallocation's old and new blocks, copied between them).
fn count(delta: isize, transient: isize) {
    // `try_with`: the allocator also runs while a thread's locals are torn
    // down. Const-initialised `Cell`s have no destructor, so this holds.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now + transient)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize, 0);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize, 0);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize), 0);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as if both blocks were live at once, as when realloc
            // has to move: the pessimistic case.
            let old = layout.size() as isize;
            count(new_size as isize - old, old.min(new_size as isize));
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`; returns its result and the most heap bytes it had live at once
/// (its result included).
fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let result = f();
    let peak = PEAK.with(Cell::get) - base;
    (result, peak.max(0) as usize)
}

/// Heap bytes per payload byte a decode of `kind` may hold (crate docs):
/// the string limit, 16, plus for `ServerMessage` its uncapped lists of
/// workers and exits (up to 2 × 144 bytes of `WorkerStatus` per 17 bytes).
fn per_byte(kind: Kind) -> usize {
    match kind {
        Kind::Server => 34,
        _ => 16,
    }
}

/// The constant part of the bound: the hello's 1 KiB floor of the limit,
/// for the others the lists capped at `MAX_TEXTS_PER_REQUEST` elements.
fn constant(kind: Kind) -> usize {
    match kind {
        Kind::Hello => 4 * 1024,
        _ => 256 * 1024,
    }
}

/// The documented bound on one `decode_payload` of `len` bytes as `kind`.
fn decode_bound(kind: Kind, len: usize) -> usize {
    per_byte(kind) * len + constant(kind)
}

/// Bound on feeding `fed` bytes through a `FrameDecoder` and decoding the
/// frame as `kind`: the decode, plus the read buffer (at most 2 × (bytes
/// received + 64 KiB), and the old block too while it grows).
fn frame_bound(kind: Kind, fed: usize) -> usize {
    decode_bound(kind, fed) + 3 * (fed + 64 * 1024)
}

// ---------------------------------------------------------------------------
// Inputs

/// xorshift64*: small, seedable, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0), near enough.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability 1 / `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A length that is usually small and sometimes not.
    fn len(&mut self) -> usize {
        match self.below(10) {
            0 => self.below(400),
            1 => 0,
            _ => self.below(12),
        }
    }

    fn string(&mut self) -> String {
        const PIECES: [&str; 8] = ["a", "Z", " ", "é", "日本", "🦀", "\0", "\u{fffd}"];
        (0..self.len())
            .map(|_| PIECES[self.below(PIECES.len())])
            .collect()
    }

    fn int(&mut self) -> u64 {
        // Each varint width about equally often.
        match self.below(5) {
            0 => self.next() % 251,
            1 => self.next() % (1 << 16),
            2 => self.next() % (1 << 32),
            3 => self.next(),
            _ => 0,
        }
    }

    fn option<T>(&mut self, make: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.one_in(2) {
            Some(make(self))
        } else {
            None
        }
    }

    fn vec<T>(&mut self, len: usize, mut make: impl FnMut(&mut Self) -> T) -> Vec<T> {
        (0..len).map(|_| make(self)).collect()
    }

    fn map<K: Ord + Copy>(&mut self, keys: &[K]) -> BTreeMap<K, u64> {
        let len = self.below(5);
        (0..len).map(|_| (self.pick(keys), self.int())).collect()
    }

    fn pick<K: Copy>(&mut self, values: &[K]) -> K {
        values[self.below(values.len())]
    }
}

fn texts(rng: &mut Rng) -> Vec<String> {
    if rng.one_in(50) {
        // The densest valid request: the cap's worth of empty texts.
        vec![String::new(); MAX_TEXTS_PER_REQUEST]
    } else {
        let len = rng.len();
        rng.vec(len, Rng::string)
    }
}

fn request_error(rng: &mut Rng) -> RequestError {
    match rng.below(11) {
        0 => RequestError::BadRequest {
            reason: rng.string(),
        },
        1 => RequestError::Overloaded {
            capacity: rng.int() as u32,
        },
        2 => RequestError::Timeout {
            elapsed_ms: rng.int(),
        },
        3 => RequestError::WorkerLost {
            deaths: rng.int() as u32,
        },
        4 => RequestError::ShuttingDown,
        5 => RequestError::Unavailable {
            reason: rng.string(),
        },
        6 => RequestError::TooManyConnections {
            reason: rng.string(),
        },
        7 => RequestError::PermissionDenied {
            reason: rng.string(),
        },
        8 => RequestError::RollFailed {
            reason: rng.string(),
        },
        _ => RequestError::Internal {
            message: rng.string(),
        },
    }
}

fn embed_result(rng: &mut Rng) -> EmbedResult {
    let count = rng.below(6);
    let dims = if rng.one_in(10) { 0 } else { rng.below(40) };
    EmbedResult {
        model: rng.string(),
        dims: dims as u32,
        embeddings: rng.vec(count, |rng| {
            rng.vec(dims, |rng| f32::from_bits(rng.next() as u32))
        }),
        truncated: rng.vec(count, |rng| rng.one_in(2)),
        token_counts: rng.vec(count, |rng| rng.int() as u32),
    }
}

fn pool_status(rng: &mut Rng) -> PoolStatus {
    let workers = rng.below(5);
    let exits = rng.below(4);
    PoolStatus {
        pid: rng.int() as u32,
        uptime_secs: rng.int(),
        model: rng.string().into(),
        target_workers: rng.int() as u32,
        workers: rng.vec(workers, |rng| WorkerStatus {
            id: rng.int(),
            pid: rng.int() as u32,
            state: rng.pick(WorkerStateKind::ALL),
            rss_bytes: rng.option(Rng::int),
            pss_bytes: rng.option(Rng::int),
            uss_bytes: rng.option(Rng::int),
            requests_served: rng.int(),
            age_secs: rng.int() as f64 / 7.0,
            cgroup: rng.option(Rng::string),
            replaces: rng.option(Rng::int),
            spare: rng.int() % 2 == 0,
            growth_bytes_per_sec: rng.option(|rng| rng.int() as f64 / 7.0),
        }),
        queue_depth: rng.int() as u32,
        queue_capacity: rng.int() as u32,
        connections: rng.int() as u32,
        max_connections: rng.int() as u32,
        queued_bytes: rng.int(),
        queued_bytes_budget: rng.int(),
        unavailable_reason: rng.option(Rng::string),
        soft_limit_bytes: rng.option(Rng::int),
        hard_limit_bytes: rng.option(Rng::int),
        limits_origin: rng.string(),
        target_spares: rng.int() as u32,
        cgroups: rng.string(),
        recent_exits: rng.vec(exits, |rng| ExitRecord {
            worker_id: rng.int(),
            pid: rng.int() as u32,
            kind: rng.pick(ExitKind::ALL),
            description: rng.string(),
            requests_served: rng.int(),
            age_secs: rng.int() as f64,
            uptime_at_exit_secs: 0.5,
        }),
        roll: rng.option(|rng| RollReport {
            generation: rng.int(),
            replaced: rng.int() as u32,
            state: match rng.below(3) {
                0 => RollState::Running {
                    proven: rng.one_in(2),
                },
                1 => RollState::Done,
                _ => RollState::Failed {
                    reason: rng.string(),
                },
            },
        }),
        chaos: rng.option(Rng::string),
        recycles: rng.vec(workers, |rng| RecycleReport {
            old_worker: rng.int(),
            replacement: rng.int(),
            trigger: rng.pick(RecycleTrigger::ALL),
            age_secs: rng.int() as f64,
            stage: rng.pick(RecycleStage::ALL),
        }),
        counters: Counters {
            requests_accepted: rng.int(),
            requests_rejected: rng.int(),
            requests_ok: rng.int(),
            requests_failed: rng.map(ErrorKind::ALL),
            retries: rng.int(),
            poison_rejections: rng.int(),
            requests_abandoned: rng.int(),
            connections_refused: rng.map(RefusalReason::ALL),
            workers_spawned: rng.int(),
            recycles: rng.map(RecycleTrigger::ALL),
            recycles_failed: rng.map(RecycleTrigger::ALL),
            worker_exits: rng.map(ExitKind::ALL),
            spares_promoted: rng.int(),
        },
    }
}

/// The message types a peer can make us decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello,
    Client,
    Server,
    Command,
    Event,
}

const KINDS: [Kind; 5] = [
    Kind::Hello,
    Kind::Client,
    Kind::Server,
    Kind::Command,
    Kind::Event,
];

/// A valid payload of `kind`, with random contents.
fn valid_payload(rng: &mut Rng, kind: Kind) -> Vec<u8> {
    let frame = match kind {
        Kind::Hello => encode_frame(&Hello {
            protocol_version: rng.int() as u32,
            software: rng.string(),
        }),
        Kind::Client => encode_frame(&match rng.below(5) {
            0 => ClientMessage::Embed {
                id: rng.int(),
                texts: texts(rng),
                deadline_ms: rng.option(Rng::int),
            },
            4 => ClientMessage::Tokenize {
                id: rng.int(),
                texts: texts(rng),
                deadline_ms: rng.option(Rng::int),
            },
            1 => ClientMessage::Status { id: rng.int() },
            2 => ClientMessage::Roll { id: rng.int() },
            _ => ClientMessage::Metrics { id: rng.int() },
        }),
        Kind::Server => encode_frame(&match rng.below(7) {
            6 => ServerMessage::Tokens {
                id: rng.int(),
                result: tokenize_result(rng),
                timing: Timing::default(),
            },
            0 => ServerMessage::Embeddings {
                id: rng.int(),
                result: embed_result(rng),
                timing: Timing {
                    queue_us: rng.int(),
                    inference_us: rng.int(),
                },
            },
            1 => ServerMessage::Status {
                id: rng.int(),
                status: pool_status(rng).into(),
            },
            2 => ServerMessage::Rolled {
                id: rng.int(),
                replaced: rng.int() as u32,
            },
            3 => ServerMessage::Metrics {
                id: rng.int(),
                text: rng.string(),
            },
            4 => ServerMessage::Error {
                id: rng.int(),
                error: request_error(rng),
            },
            _ => ServerMessage::Refused {
                error: request_error(rng),
            },
        }),
        Kind::Command => encode_frame(&match rng.below(4) {
            3 => WorkerCommand::Tokenize {
                request_id: rng.int(),
                texts: texts(rng).into(),
            },
            0 => WorkerCommand::Start(WorkerConfig {
                worker_id: rng.int(),
                model_path: rng.string().into(),
                tokenizer_path: rng.string().into(),
                max_seq_len: rng.int() as usize,
                normalize: rng.one_in(2),
                warm_up: rng.one_in(2),
                trim_memory: rng.one_in(2),
                max_batch_texts: rng.int() as usize,
                limits: RequestLimits {
                    max_texts: rng.int() as usize,
                    max_text_bytes: rng.int() as usize,
                },
                max_frame_bytes: rng.int() as usize,
                chaos: ChaosOptions {
                    crash_marker: rng.option(Rng::string),
                    hang_marker: rng.option(Rng::string),
                    leak_bytes_per_request: rng.int(),
                },
            }),
            1 => WorkerCommand::Embed {
                request_id: rng.int(),
                texts: texts(rng).into(),
            },
            _ => WorkerCommand::Shutdown,
        }),
        Kind::Event => encode_frame(&match rng.below(5) {
            4 => WorkerEvent::Tokenized {
                request_id: rng.int(),
                result: tokenize_result(rng),
            },
            0 => WorkerEvent::Ready {
                model: rng.string(),
                dims: rng.int() as u32,
                load_ms: rng.int(),
            },
            1 => WorkerEvent::LoadFailed {
                reason: rng.string(),
            },
            2 => WorkerEvent::Embedded {
                request_id: rng.int(),
                result: embed_result(rng),
            },
            _ => WorkerEvent::Rejected {
                request_id: rng.int(),
                error: request_error(rng),
            },
        }),
    };
    frame.expect("a valid message encodes")[4..].to_vec()
}

/// Random token lists, one per (random) text.
fn tokenize_result(rng: &mut Rng) -> TokenizeResult {
    let lists = rng.below(4);
    TokenizeResult {
        tokens: (0..lists)
            .map(|_| {
                (0..rng.below(6))
                    .map(|_| Token {
                        id: rng.int() as u32,
                        text: rng.string(),
                        special: rng.one_in(2),
                        start: rng.option(|r| r.int() as u32),
                        stop: rng.option(|r| r.int() as u32),
                    })
                    .collect()
            })
            .collect(),
    }
}

/// Bytes that make decoders take unusual paths: varint markers (0xfb u16,
/// 0xfc u32, 0xfd u64, 0xfe u128), enum/option/bool edges.
const INTERESTING: [u8; 10] = [0x00, 0x01, 0x02, 0x7f, 0x80, 0xfa, 0xfb, 0xfc, 0xfd, 0xff];

/// A varint length that is large or huge.
fn big_varint(rng: &mut Rng) -> Vec<u8> {
    let value = match rng.below(3) {
        0 => 1u64 << rng.below(64),
        1 => (1u64 << rng.below(64)).wrapping_sub(1 + rng.below(16) as u64),
        _ => rng.next(),
    };
    match rng.below(4) {
        0 => {
            let mut out = vec![0xfb];
            out.extend_from_slice(&(value as u16).to_le_bytes());
            out
        }
        1 => {
            let mut out = vec![0xfc];
            out.extend_from_slice(&(value as u32).to_le_bytes());
            out
        }
        _ => {
            let mut out = vec![0xfd];
            out.extend_from_slice(&value.to_le_bytes());
            out
        }
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[(Kind, Vec<u8>)]) {
    let at = |rng: &mut Rng, len: usize| rng.below(len + 1);
    match rng.below(8) {
        0 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] ^= 1 << rng.below(8);
        }
        1 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        2 => {
            let i = at(rng, input.len());
            let byte = if rng.one_in(2) {
                INTERESTING[rng.below(INTERESTING.len())]
            } else {
                rng.next() as u8
            };
            input.insert(i, byte);
        }
        3 if !input.is_empty() => {
            let i = rng.below(input.len());
            let end = (i + 1 + rng.below(8)).min(input.len());
            input.drain(i..end);
        }
        4 => input.truncate(at(rng, input.len())),
        5 => {
            // Splice a piece of another input in.
            let other = &corpus[rng.below(corpus.len())].1;
            let from = at(rng, other.len());
            let to = (from + rng.below(64)).min(other.len());
            let i = at(rng, input.len());
            input.splice(i..i, other[from..to].iter().copied());
        }
        _ => {
            // A huge length, inserted or written over what was there.
            let i = at(rng, input.len());
            let varint = big_varint(rng);
            if rng.one_in(2) {
                input.splice(i..i, varint);
            } else {
                let end = (i + varint.len()).min(input.len());
                input.splice(i..end, varint);
            }
        }
    }
}

fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    let len = if rng.one_in(20) {
        rng.below(4096)
    } else {
        rng.below(48)
    };
    (0..len)
        .map(|_| {
            if rng.one_in(4) {
                INTERESTING[rng.below(INTERESTING.len())]
            } else {
                rng.next() as u8
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Decoding and accounting

#[derive(Debug, Default)]
struct Stats {
    decodes: u64,
    ok: u64,
    err: u64,
    /// Highest peak / payload length seen, with the peak and the length.
    worst_ratio: (f64, usize, usize),
    /// Highest peak / payload length among payloads of 1 KiB or more.
    worst_ratio_large: (f64, usize, usize),
    /// Highest peak seen at all, with its payload length.
    worst_peak: (usize, usize),
}

impl Stats {
    /// The largest peak with its payload length and their ratio.
    fn worst_peak_ratio(&self) -> (f64, usize, usize) {
        let (peak, len) = self.worst_peak;
        (peak as f64 / len.max(1) as f64, peak, len)
    }

    fn record(&mut self, ok: bool, peak: usize, len: usize) {
        self.decodes += 1;
        if ok {
            self.ok += 1;
        } else {
            self.err += 1;
        }
        let ratio = peak as f64 / len.max(1) as f64;
        if ratio > self.worst_ratio.0 {
            self.worst_ratio = (ratio, peak, len);
        }
        if len >= 1024 && ratio > self.worst_ratio_large.0 {
            self.worst_ratio_large = (ratio, peak, len);
        }
        if peak > self.worst_peak.0 {
            self.worst_peak = (peak, len);
        }
    }
}

/// Decodes `payload` as `T` (which is `kind`) and checks the bound.
fn decode_as<T: DeserializeOwned + Debug>(
    kind: Kind,
    payload: &[u8],
    stats: &mut Stats,
    seed: u64,
) -> bool {
    let (result, peak) = measure(|| decode_payload::<T>(payload).is_ok());
    let bound = decode_bound(kind, payload.len());
    assert!(
        peak <= bound,
        "decoding {} bytes as {kind:?} allocated {peak} bytes at once, over the bound of \
         {bound} (INFERD_FUZZ_SEED={seed}); payload: {payload:02x?}",
        payload.len(),
    );
    stats.record(result, peak, payload.len());
    result
}

fn decode_as_kind(kind: Kind, payload: &[u8], stats: &mut [Stats], seed: u64) -> bool {
    let stats = &mut stats[kind as usize];
    match kind {
        Kind::Hello => decode_as::<Hello>(kind, payload, stats, seed),
        Kind::Client => decode_as::<ClientMessage>(kind, payload, stats, seed),
        Kind::Server => decode_as::<ServerMessage>(kind, payload, stats, seed),
        Kind::Command => decode_as::<WorkerCommand>(kind, payload, stats, seed),
        Kind::Event => decode_as::<WorkerEvent>(kind, payload, stats, seed),
    }
}

/// Frames `payload` (sometimes with a lying length prefix), feeds it to a
/// `FrameDecoder` in random pieces, and decodes what comes out as `kind`.
fn through_frame_decoder(rng: &mut Rng, kind: Kind, payload: &[u8], stats: &mut Stats, seed: u64) {
    const MAX_FRAME: usize = 1 << 20;
    let announced = match rng.below(6) {
        0 => rng.below(MAX_FRAME + 2) as u32,
        1 => rng.next() as u32,
        _ => payload.len() as u32,
    };
    let mut stream = announced.to_le_bytes().to_vec();
    stream.extend_from_slice(payload);
    let pieces: Vec<usize> = {
        let mut cuts = vec![0, stream.len()];
        for _ in 0..rng.below(6) {
            cuts.push(rng.below(stream.len() + 1));
        }
        cuts.sort_unstable();
        cuts
    };

    let decoder = FrameDecoder::new(MAX_FRAME);
    let (outcome, peak) = measure(|| {
        let mut buf = BytesMut::new();
        for piece in pieces.windows(2) {
            buf.extend_from_slice(&stream[piece[0]..piece[1]]);
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let decoded = match kind {
                        Kind::Hello => decode_payload::<Hello>(&frame).map(drop),
                        Kind::Client => decode_payload::<ClientMessage>(&frame).map(drop),
                        Kind::Server => decode_payload::<ServerMessage>(&frame).map(drop),
                        Kind::Command => decode_payload::<WorkerCommand>(&frame).map(drop),
                        Kind::Event => decode_payload::<WorkerEvent>(&frame).map(drop),
                    };
                    return Some(decoded.is_ok());
                }
                Ok(None) => {}
                Err(ProtoError::FrameTooLarge { .. }) => return Some(false),
                Err(other) => panic!("FrameDecoder failed otherwise: {other:?}"),
            }
        }
        None // still waiting for the rest of the announced frame
    });
    assert!(
        peak <= frame_bound(kind, stream.len()),
        "feeding a {}-byte stream (length prefix {announced}) through a FrameDecoder \
         allocated {peak} bytes at once, over the bound of {} (INFERD_FUZZ_SEED={seed})",
        stream.len(),
        frame_bound(kind, stream.len()),
    );
    if announced as usize == payload.len() {
        assert!(outcome.is_some(), "a whole frame was fed but none came out");
    }
    stats.record(outcome == Some(true), peak, stream.len());
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

#[test]
fn decoders_stay_within_the_allocation_bound() {
    let iterations = env_u64("INFERD_FUZZ_ITERATIONS", 1_000_000);
    let seed = env_u64("INFERD_FUZZ_SEED", 0x1f_e2d0);
    let mut rng = Rng::new(seed);
    let started = Instant::now();

    let corpus: Vec<(Kind, Vec<u8>)> = (0..2000)
        .map(|i| {
            let kind = KINDS[i % KINDS.len()];
            (kind, valid_payload(&mut rng, kind))
        })
        .collect();
    // One per message type, then the FrameDecoder path.
    let mut stats: Vec<Stats> = (0..=KINDS.len()).map(|_| Stats::default()).collect();
    let (per_kind, frames) = stats.split_at_mut(KINDS.len());
    let mut decodes = 0;

    while decodes < iterations {
        let (kind, input) = match rng.below(10) {
            0 => (KINDS[rng.below(KINDS.len())], random_bytes(&mut rng)),
            1 => {
                // A fresh valid payload must decode as its own type.
                let kind = KINDS[rng.below(KINDS.len())];
                let payload = valid_payload(&mut rng, kind);
                assert!(
                    decode_as_kind(kind, &payload, per_kind, seed),
                    "a valid {kind:?} payload did not decode (INFERD_FUZZ_SEED={seed}): \
                     {payload:02x?}"
                );
                decodes += 1;
                (kind, payload)
            }
            _ => {
                let (kind, mut input) = corpus[rng.below(corpus.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    mutate(&mut rng, &mut input, &corpus);
                }
                (kind, input)
            }
        };
        for kind in KINDS {
            decode_as_kind(kind, &input, per_kind, seed);
        }
        through_frame_decoder(&mut rng, kind, &input, &mut frames[0], seed);
        decodes += KINDS.len() as u64 + 1;
    }

    let elapsed = started.elapsed().as_secs_f64();
    let names = KINDS
        .iter()
        .map(|kind| format!("{kind:?}"))
        .chain(["FrameDecoder".to_owned()]);
    for (name, stats) in names.zip(&stats) {
        let (ratio, peak, len) = stats.worst_ratio;
        let (ratio_large, peak_large, len_large) = stats.worst_ratio_large;
        println!(
            "fuzz {name}: {} ok, {} err; worst {ratio:.0}x ({peak} B for {len} B), \
             for >= 1 KiB {ratio_large:.1}x ({peak_large} B for {len_large} B); \
             largest peak {} B (for {} B)",
            stats.ok, stats.err, stats.worst_peak.0, stats.worst_peak.1,
        );
        assert!(stats.ok > 0 && stats.err > 0, "{name}: {stats:?}");
    }
    let total = |field: fn(&Stats) -> u64| stats.iter().map(field).sum::<u64>();
    // Of `decode_payload` (the FrameDecoder line above adds its buffer).
    let worst = |pick: fn(&Stats) -> (f64, usize, usize)| {
        stats[..KINDS.len()]
            .iter()
            .map(pick)
            .fold((0.0, 0, 0), |a, b| if b.0 > a.0 { b } else { a })
    };
    let (small, large) = (worst(|s| s.worst_ratio), worst(|s| s.worst_ratio_large));
    println!(
        "fuzz: {} inputs decoded in {elapsed:.1} s ({:.0}/s), {} ok, {} err, seed {seed}; \
         worst decode_payload amplification {:.0}x ({} B allocated for {} B), \
         {:.1}x for payloads >= 1 KiB ({} B for {} B)",
        total(|s| s.decodes),
        total(|s| s.decodes) as f64 / elapsed,
        total(|s| s.ok),
        total(|s| s.err),
        small.0,
        small.1,
        small.2,
        large.0,
        large.1,
        large.2,
    );
}

// ---------------------------------------------------------------------------
// Hand-made worst cases

/// bincode's varint encoding of `value`.
fn varint(value: u64) -> Vec<u8> {
    match value {
        0..=250 => vec![value as u8],
        251..=0xffff => [&[0xfb][..], &(value as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[0xfc][..], &(value as u32).to_le_bytes()].concat(),
        _ => [&[0xfd][..], &value.to_le_bytes()].concat(),
    }
}

/// Stands for the string a hostile payload puts its huge length in.
const MARKER: &str = "<<hostile string>>";

fn payload_of<T: serde::Serialize>(message: &T) -> Vec<u8> {
    encode_frame(message).unwrap()[4..].to_vec()
}

/// `message` (which holds [`MARKER`]) cut where the marker's length begins,
/// then a length as large as the decode limit lets through, then padding to
/// a length whose limit is nearly 16 bytes per byte (8 × length just past a
/// power of two). The decoder allocates the claimed length, then finds the
/// bytes missing. The largest such length is found by bisection.
fn claim_the_limit(kind: Kind, message: &[u8]) -> Vec<u8> {
    let at = message
        .windows(MARKER.len())
        .position(|window| window == MARKER.as_bytes())
        .expect("message holds the marker")
        - 1; // the marker's one-byte length
    let prefix = &message[..at];
    let len = ((8 * (prefix.len() + 10)).max(1024).next_power_of_two() / 8 + 1).max(129);
    let limit = (8 * len).max(1024).next_power_of_two() as u64;
    let build = |claim: u64| {
        let mut payload = prefix.to_vec();
        payload.extend(varint(claim));
        payload.resize(len, b'x');
        payload
    };
    let refused = |claim: u64| {
        let payload = build(claim);
        let mut stats: Vec<Stats> = (0..KINDS.len()).map(|_| Stats::default()).collect();
        assert!(!decode_as_kind(kind, &payload, &mut stats, 0));
        let err = match kind {
            Kind::Hello => decode_payload::<Hello>(&payload).map(drop),
            Kind::Client => decode_payload::<ClientMessage>(&payload).map(drop),
            Kind::Server => decode_payload::<ServerMessage>(&payload).map(drop),
            Kind::Command => decode_payload::<WorkerCommand>(&payload).map(drop),
            Kind::Event => decode_payload::<WorkerEvent>(&payload).map(drop),
        }
        .unwrap_err();
        err.to_string().contains("LimitExceeded")
    };
    // The largest claim that is not refused outright: bisect on (ok, refused].
    let (mut ok, mut refused_at) = (len as u64, limit + 1);
    assert!(!refused(ok) && refused(refused_at));
    while refused_at - ok > 1 {
        let mid = ok + (refused_at - ok) / 2;
        if refused(mid) {
            refused_at = mid;
        } else {
            ok = mid;
        }
    }
    build(ok)
}

fn status_with(
    workers: usize,
    exits: usize,
    map_keys: usize,
    reason: Option<&str>,
) -> ServerMessage {
    // Keys are enums: a map holds each at most once, however many entries
    // a sender writes.
    let map: BTreeMap<ErrorKind, u64> = ErrorKind::ALL
        .iter()
        .cycle()
        .take(map_keys)
        .map(|&kind| (kind, 0))
        .collect();
    ServerMessage::Status {
        id: 0,
        status: Box::new(PoolStatus {
            workers: vec![WorkerStatus::default(); workers],
            recent_exits: vec![
                ExitRecord {
                    worker_id: 0,
                    pid: 0,
                    kind: ExitKind::Exited,
                    description: String::new(),
                    requests_served: 0,
                    age_secs: 0.0,
                    uptime_at_exit_secs: 0.0,
                };
                exits
            ],
            unavailable_reason: reason.map(str::to_owned),
            counters: Counters {
                requests_failed: map,
                ..Counters::default()
            },
            ..PoolStatus::default()
        }),
    }
}

fn empty_vectors(count: usize) -> EmbedResult {
    EmbedResult {
        model: String::new(),
        dims: 0,
        embeddings: vec![Vec::new(); count],
        truncated: vec![false; count],
        token_counts: vec![0; count],
    }
}

/// A hand-made payload: name, type, whether it is valid, bytes.
type Case = (String, Kind, bool, Vec<u8>);

/// Payloads built to make a decoder allocate as much as it can per byte:
/// the densest valid messages, and hostile lengths behind dense prefixes.
fn worst_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut valid =
        |name: String, kind: Kind, payload: Vec<u8>| cases.push((name, kind, true, payload));
    let mut hostile = Vec::new();
    let mut invalid =
        |name: String, kind: Kind, payload: Vec<u8>| hostile.push((name, kind, false, payload));

    invalid(
        "hello, hostile software".into(),
        Kind::Hello,
        claim_the_limit(
            Kind::Hello,
            &payload_of(&Hello {
                protocol_version: 4,
                software: MARKER.into(),
            }),
        ),
    );
    // Around the text vector's growth steps (it preallocates 170 and doubles).
    for count in [1, 170, 171, 341, 2721, 4096] {
        let mut texts = vec![String::new(); count];
        valid(
            format!("client, {count} empty texts"),
            Kind::Client,
            payload_of(&ClientMessage::Embed {
                id: 0,
                texts: texts.clone(),
                deadline_ms: None,
            }),
        );
        valid(
            format!("command, {count} empty texts"),
            Kind::Command,
            payload_of(&WorkerCommand::Embed {
                request_id: 0,
                texts: texts.clone().into(),
            }),
        );
        valid(
            format!("event, {count} empty vectors"),
            Kind::Event,
            payload_of(&WorkerEvent::Embedded {
                request_id: 0,
                result: empty_vectors(count),
            }),
        );
        valid(
            format!("server, {count} empty vectors"),
            Kind::Server,
            payload_of(&ServerMessage::Embeddings {
                id: 0,
                result: empty_vectors(count),
                timing: Timing::default(),
            }),
        );
        texts[count - 1] = MARKER.into();
        invalid(
            format!("client, {} empty texts, then a hostile one", count - 1),
            Kind::Client,
            claim_the_limit(
                Kind::Client,
                &payload_of(&ClientMessage::Embed {
                    id: 0,
                    texts: texts.clone(),
                    deadline_ms: None,
                }),
            ),
        );
        invalid(
            format!("command, {} empty texts, then a hostile one", count - 1),
            Kind::Command,
            claim_the_limit(
                Kind::Command,
                &payload_of(&WorkerCommand::Embed {
                    request_id: 0,
                    texts: texts.into(),
                }),
            ),
        );
        // The count declared, no texts sent.
        let mut declared = vec![0, 0];
        declared.extend(varint(count as u64));
        invalid(
            format!("client, {count} texts declared, none sent"),
            Kind::Client,
            declared,
        );
    }
    // 897 and 3585: just past a growth step of the worker vector (it
    // preallocates 28 and doubles), filling payloads whose limit is ~16/byte.
    for count in [10, 100, 897, 1000, 3585, 10_000] {
        valid(
            format!("server, {count} default workers"),
            Kind::Server,
            payload_of(&status_with(count, 0, 0, None)),
        );
        valid(
            format!("server, {count} default exits"),
            Kind::Server,
            payload_of(&status_with(0, count, 0, None)),
        );
        valid(
            format!("server, a map built from {count} keys"),
            Kind::Server,
            payload_of(&status_with(0, 0, count, None)),
        );
        let floats = ServerMessage::Embeddings {
            id: 0,
            result: EmbedResult {
                embeddings: vec![vec![0.5; count]],
                ..empty_vectors(0)
            },
            timing: Timing::default(),
        };
        valid(
            format!("server, one vector of {count} floats"),
            Kind::Server,
            payload_of(&floats),
        );
        invalid(
            format!("server, {count} default workers, then a hostile string"),
            Kind::Server,
            claim_the_limit(
                Kind::Server,
                &payload_of(&status_with(count, 0, 0, Some(MARKER))),
            ),
        );
    }
    cases.extend(hostile);
    cases
}

#[test]
fn hand_made_worst_cases_stay_within_the_bound() {
    for (name, kind, valid, payload) in worst_cases() {
        let mut stats: Vec<Stats> = (0..KINDS.len()).map(|_| Stats::default()).collect();
        let decoded = decode_as_kind(kind, &payload, &mut stats, 0);
        assert_eq!(decoded, valid, "{name}");
        let (ratio, peak, len) = stats[kind as usize].worst_peak_ratio();
        println!("worst case {name}: {len} B -> {peak} B ({ratio:.1}x)");
    }
}

#[test]
fn the_counter_sees_what_a_decode_allocates() {
    // A valid 100 KB string is allocated whole by the decode; a bound that
    // the counter failed to see would go unnoticed.
    let software = "s".repeat(100_000);
    let payload = payload_of(&Hello {
        protocol_version: 4,
        software,
    });
    let (hello, peak) = measure(|| decode_payload::<Hello>(&payload).unwrap());
    assert!(peak >= 100_000, "counted {peak} bytes");
    assert!(peak < 100_000 + 1024, "counted {peak} bytes");
    drop(hello);
    // Reallocation counts the new size, and the old block while it moves.
    let (_, peak) = measure(|| {
        let mut grown = Vec::<u8>::with_capacity(1000);
        grown.reserve_exact(5000);
        grown
    });
    assert_eq!(peak, 1000 + 5000);
}
