//! Deserializers for the sequences in peer-sent messages, used through
//! `#[serde(deserialize_with = ...)]`.
//!
//! A sequence's declared length costs the sender one varint, and serde's own
//! `Vec` visitor trusts it for up to 1 MiB of preallocation: a few hostile
//! bytes would buy a megabyte per (nested) sequence before the decoder finds
//! out the elements are not there. These visitors preallocate at most
//! [`PREALLOC_BYTES`] on the strength of the declared length and grow only
//! as elements actually decode. Where the protocol has a natural cap (texts
//! per request, and so entries per result) they also refuse a longer list as
//! soon as its length is read.

use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;
use std::sync::Arc;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

use crate::MAX_TEXTS_PER_REQUEST;

/// Most bytes a sequence preallocates before its elements arrive. Small, so
/// a lying length buys little; beyond it the vector doubles as elements
/// decode, which keeps large honest sequences amortised.
const PREALLOC_BYTES: usize = 4096;

/// Visits a sequence into a `Vec<T>` of at most `max` elements.
struct BoundedVec<T> {
    /// Most elements accepted.
    max: usize,
    /// What the elements are, plural, for the error message.
    what: &'static str,
    /// The element type, without storing one.
    _element: PhantomData<fn() -> T>,
}

impl<T> BoundedVec<T> {
    fn new(max: usize, what: &'static str) -> Self {
        Self {
            max,
            what,
            _element: PhantomData,
        }
    }

    fn too_many<E: Error>(&self, count: &dyn fmt::Display) -> E {
        E::custom(format_args!(
            "{count} {} exceed the wire limit of {}",
            self.what, self.max
        ))
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedVec<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a sequence of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // bincode declares the exact length up front: refuse before reading on.
        let declared = seq.size_hint().unwrap_or(0);
        if declared > self.max {
            return Err(self.too_many(&declared));
        }
        let mut items = Vec::with_capacity(declared.min(PREALLOC_BYTES / size_of::<T>().max(1)));
        while let Some(item) = seq.next_element()? {
            // Formats without a declared length get the same cap.
            if items.len() == self.max {
                return Err(self.too_many(&format_args!("more than {}", self.max)));
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// The texts of an embed request: at most [`MAX_TEXTS_PER_REQUEST`].
pub(crate) fn texts<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    deserializer.deserialize_seq(BoundedVec::new(
        MAX_TEXTS_PER_REQUEST,
        "texts in one request",
    ))
}

/// [`texts`], shared.
pub(crate) fn shared_texts<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Arc<[String]>, D::Error> {
    texts(deserializer).map(Arc::from)
}

/// A per-text list of a result: at most [`MAX_TEXTS_PER_REQUEST`] entries.
pub(crate) fn per_text<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_seq(BoundedVec::new(
        MAX_TEXTS_PER_REQUEST,
        "entries in a per-text list",
    ))
}

/// The vectors of a result: at most [`MAX_TEXTS_PER_REQUEST`], each read
/// with [`vec`].
pub(crate) fn embeddings<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Vec<f32>>, D::Error> {
    /// One embedding, so that the inner vectors get the bounded visitor too.
    #[derive(serde::Deserialize)]
    #[serde(transparent)]
    struct Vector(#[serde(deserialize_with = "vec")] Vec<f32>);

    let vectors: Vec<Vector> = per_text(deserializer)?;
    // Same layout, so this collects in place.
    Ok(vectors.into_iter().map(|vector| vector.0).collect())
}

/// The tokens of a tokenize result: at most [`MAX_TEXTS_PER_REQUEST`]
/// lists, each read with [`vec`].
pub(crate) fn tokens<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Vec<crate::Token>>, D::Error> {
    /// One text's tokens, so that the inner lists get the bounded visitor too.
    #[derive(serde::Deserialize)]
    #[serde(transparent)]
    struct Tokens(#[serde(deserialize_with = "vec")] Vec<crate::Token>);

    let lists: Vec<Tokens> = per_text(deserializer)?;
    Ok(lists.into_iter().map(|list| list.0).collect())
}

/// Any other sequence: no cap on the count (the frame size bounds it), only
/// on the preallocation.
pub(crate) fn vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_seq(BoundedVec::new(usize::MAX, "elements"))
}
