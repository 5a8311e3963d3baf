//! The `input`/`inputs` field of the embedding routes, read straight from
//! the body with bounded counts.
//!
//! Parsing a body into a `serde_json::Value` first would cost up to about
//! sixteen times its size (every `1,` of an id list becomes a 32-byte
//! value), so this field is deserialized in one pass into what the route
//! needs: texts, or lists of token ids. A list of more than [`MAX_INPUTS`]
//! inputs, or an id list longer than [`MAX_IDS_PER_INPUT`], is refused at
//! the first element past the limit, before anything is allocated for it.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

/// Most inputs in one request: OpenAI's own limit.
pub const MAX_INPUTS: usize = 2048;
/// Most token ids in one input: far more than any model here reads (256),
/// and than LangChain sends (8191 per chunk).
pub const MAX_IDS_PER_INPUT: usize = 65_536;

/// What the field says, in one of the shapes OpenAI accepts.
const SHAPE: &str = "input must be a string, an array of strings, or token ids";

/// What an `input`/`inputs` value holds.
#[derive(Debug, PartialEq)]
pub enum Inputs {
    /// A string or an array of strings.
    Texts(Vec<String>),
    /// Token ids: an array of integers (one input), or of such arrays.
    TokenIds(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InputsVisitor)
    }
}

struct InputsVisitor;

impl<'de> Visitor<'de> for InputsVisitor {
    type Value = Inputs;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(SHAPE)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Inputs, E> {
        Ok(Inputs::Texts(vec![text.to_owned()]))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Inputs, E> {
        Ok(Inputs::Texts(vec![text]))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Inputs, E> {
        Err(E::custom(format_args!("{SHAPE}, not a number")))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Inputs, E> {
        Err(E::custom(format_args!("{SHAPE}, not a number")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Inputs, E> {
        Err(E::custom(format_args!("{SHAPE}, not a number")))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Inputs, E> {
        Err(E::custom(format_args!("{SHAPE}, not a boolean")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Inputs, E> {
        Err(E::custom(format_args!("{SHAPE}, not null")))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Inputs, A::Error> {
        Err(de::Error::custom(format_args!("{SHAPE}, not an object")))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inputs, A::Error> {
        let mut texts = Vec::new();
        let mut flat_ids = Vec::new();
        let mut id_lists = Vec::new();
        while let Some(item) = seq.next_element::<Item>()? {
            match item {
                Item::Text(text) if flat_ids.is_empty() && id_lists.is_empty() => texts.push(text),
                Item::Id(id) if texts.is_empty() && id_lists.is_empty() => {
                    if flat_ids.len() == MAX_IDS_PER_INPUT {
                        return Err(de::Error::custom(format_args!(
                            "more than {MAX_IDS_PER_INPUT} token ids in one input"
                        )));
                    }
                    flat_ids.push(id)
                }
                Item::Ids(ids) if texts.is_empty() && flat_ids.is_empty() => id_lists.push(ids),
                _ => {
                    return Err(de::Error::custom(format_args!(
                        "{SHAPE}, not a mix of them"
                    )))
                }
            }
            if texts.len().max(id_lists.len()) > MAX_INPUTS {
                return Err(de::Error::custom(format_args!(
                    "more than {MAX_INPUTS} inputs in one request; the limit is {MAX_INPUTS}"
                )));
            }
        }
        Ok(match (texts.is_empty(), flat_ids.is_empty()) {
            (false, _) => Inputs::Texts(texts),
            (_, false) => Inputs::TokenIds(vec![flat_ids]),
            _ if !id_lists.is_empty() => Inputs::TokenIds(id_lists),
            // An empty array: no texts, which the pool answers as such.
            _ => Inputs::Texts(Vec::new()),
        })
    }
}

/// One element of an `input` array.
enum Item {
    /// A text.
    Text(String),
    /// A token id (the array is one input's ids).
    Id(u32),
    /// One input's token ids.
    Ids(Vec<u32>),
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemVisitor)
    }
}

/// Token ids are whole numbers below 2^32.
const IDS: &str = "token ids are whole numbers below 2^32";

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a token id, or an array of token ids")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Item, E> {
        Ok(Item::Text(text.to_owned()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Item, E> {
        Ok(Item::Text(text))
    }

    fn visit_u64<E: de::Error>(self, id: u64) -> Result<Item, E> {
        u32::try_from(id).map(Item::Id).map_err(|_| E::custom(IDS))
    }

    fn visit_i64<E: de::Error>(self, id: i64) -> Result<Item, E> {
        u32::try_from(id).map(Item::Id).map_err(|_| E::custom(IDS))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Item, E> {
        Err(E::custom(IDS))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        let mut ids = Vec::new();
        while let Some(id) = seq.next_element::<Id>()? {
            if ids.len() == MAX_IDS_PER_INPUT {
                return Err(de::Error::custom(format_args!(
                    "more than {MAX_IDS_PER_INPUT} token ids in one input"
                )));
            }
            ids.push(id.0);
        }
        Ok(Item::Ids(ids))
    }
}

/// One token id inside an id list.
struct Id(u32);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_any(ItemVisitor)? {
            Item::Id(id) => Ok(Id(id)),
            _ => Err(de::Error::custom(format_args!(
                "each entry must be an array of token ids ({IDS})"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(json: &str) -> Result<Inputs, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn inputs_are_strings_arrays_of_strings_or_token_ids() {
        let texts = |v: &[&str]| Ok(Inputs::Texts(v.iter().map(|s| s.to_string()).collect()));
        assert_eq!(inputs(r#""a""#), texts(&["a"]));
        assert_eq!(inputs(r#"["a", "b"]"#), texts(&["a", "b"]));
        assert_eq!(inputs("[1, 2]"), Ok(Inputs::TokenIds(vec![vec![1, 2]])));
        assert_eq!(
            inputs("[[1, 2], [3], []]"),
            Ok(Inputs::TokenIds(vec![vec![1, 2], vec![3], vec![]]))
        );
        let message = inputs("3").expect_err("a number is not an input");
        assert!(message.contains("not a number"), "{message}");
        assert!(inputs(r#"["a", 1]"#).is_err());
        for bad in ["[-1]", "[1.5]", "[4294967296]", r#"[[1], ["a"]]"#] {
            let message = inputs(bad).expect_err("not token ids");
            assert!(message.contains("token ids"), "{bad}: {message}");
        }
    }

    #[test]
    fn counts_are_refused_at_the_first_element_past_the_limit() {
        let texts = format!("[{}]", vec![r#""a""#; MAX_INPUTS].join(","));
        assert!(inputs(&texts).is_ok(), "exactly the limit");
        let one_more = format!("[{}]", vec![r#""a""#; MAX_INPUTS + 1].join(","));
        let message = inputs(&one_more).expect_err("past the limit");
        assert!(message.contains("2048"), "{message}");
        let lists = format!("[{}]", vec!["[1]"; MAX_INPUTS + 1].join(","));
        assert!(inputs(&lists).is_err());
        let ids = format!("[[{}]]", vec!["7"; MAX_IDS_PER_INPUT + 1].join(","));
        let message = inputs(&ids).expect_err("too many ids");
        assert!(message.contains("65536"), "{message}");
        let flat = format!("[{}]", vec!["7"; MAX_IDS_PER_INPUT + 1].join(","));
        assert!(inputs(&flat).is_err());
        // A hostile tail after the limit is never read: the error comes
        // from the element past the limit, not from the malformed end.
        let hostile = format!("[{},\"a\", !!!", vec![r#""a""#; MAX_INPUTS].join(","));
        let message = inputs(&hostile).expect_err("refused");
        assert!(message.contains("2048"), "{message}");
    }
}
