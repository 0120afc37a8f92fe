//! JSON shapes of safetensors headers and index files, read without losing
//! duplicate keys: serde_json's maps keep only the last of two equal keys,
//! which would hide a second, conflicting tensor entry.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// A JSON object's members in file order, duplicates kept.
#[derive(Debug, Default)]
pub(crate) struct Entries<V>(pub(crate) Vec<(String, V)>);

impl<V> Entries<V> {
    /// The first key that occurs a second time, if any.
    pub(crate) fn first_duplicate(&self) -> Option<&str> {
        first_duplicate(self.0.iter().map(|(k, _)| k.as_str()))
    }
}

/// The first name that occurs a second time in `names`, if any.
pub(crate) fn first_duplicate<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = HashSet::new();
    names.into_iter().find(|name| !seen.insert(*name))
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// A safetensors header as written: every `__metadata__` member (normally
/// one) and the tensor entries, both in file order with duplicates kept.
#[derive(Debug, Default)]
pub(crate) struct RawHeader {
    pub(crate) metadata: Vec<Entries<Value>>,
    pub(crate) tensors: Vec<(String, Value)>,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;

        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeader;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to their entries")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut header = RawHeader::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        header.metadata.push(map.next_value()?);
                    } else {
                        header.tensors.push((key, map.next_value()?));
                    }
                }
                Ok(header)
            }
        }

        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// `model.safetensors.index.json` as Hugging Face writes it; other members
/// (`metadata` with `total_size`) are not needed to read the shards.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct RawIndex {
    pub(crate) weight_map: Entries<String>,
}
