//! Objects only where the configuration has objects.
//!
//! serde's derived `Deserialize` for a struct accepts a JSON array of its fields in order as
//! well as an object, `deny_unknown_fields` or not: `"models": [["qwen"]]` would read as a
//! model named `qwen`, and `"prefixAffinity": [true]` as prefix affinity on. Nobody writes that
//! on purpose, so the configuration refuses it (the config fuzzer found it: `make fuzz`).
//! [`objects_only`] deserializes a [`serde_json::Value`] through [`Strict`], which hands every
//! nested value to the target type the same way and refuses an array where a struct is read.
//! It runs after the ordinary parse has accepted the text, so that the ordinary parse's errors,
//! with their line and column, stay the ones users see for everything else.

use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, MapAccess, SeqAccess};
use serde::forward_to_deserialize_any;
use serde_json::{Map, Value};

/// `T` read from `value` with every struct required to be a JSON object. The error names the
/// field (`models[0]`, `prefixAffinity.picker`).
pub fn objects_only<T: DeserializeOwned>(value: Value) -> Result<T, serde_json::Error> {
    T::deserialize(Strict(value, String::new()))
}

/// A JSON value whose structs must be objects, all the way down, and where it sits.
struct Strict(Value, String);

impl<'de> Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(StrictSeq {
                items: items.into_iter().enumerate(),
                path: self.1,
            }),
            Value::Object(map) => visitor.visit_map(StrictMap {
                entries: map.into_iter(),
                value: None,
                path: self.1,
            }),
            scalar => scalar.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::custom(format_args!(
                "`{}` must be a JSON object, not {}",
                if self.1.is_empty() {
                    "the configuration"
                } else {
                    &self.1
                },
                kind(&other)
            ))),
        }
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        // The configuration's enums are plain strings (`unknownModel`).
        self.0.deserialize_enum(name, variants, visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map identifier ignored_any
    }
}

/// What a JSON value is, for the refusal.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct StrictSeq {
    items: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    path: String,
}

impl<'de> SeqAccess<'de> for StrictSeq {
    type Error = serde_json::Error;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.items
            .next()
            .map(|(i, item)| seed.deserialize(Strict(item, format!("{}[{i}]", self.path))))
            .transpose()
    }
}

struct StrictMap {
    entries: <Map<String, Value> as IntoIterator>::IntoIter,
    /// The value of the key just read, and its path.
    value: Option<(Value, String)>,
    path: String,
}

impl<'de> MapAccess<'de> for StrictMap {
    type Error = serde_json::Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.entries.next() {
            Some((key, value)) => {
                let path = if self.path.is_empty() {
                    key.clone()
                } else {
                    format!("{}.{key}", self.path)
                };
                self.value = Some((value, path));
                seed.deserialize(key.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value.take() {
            Some((value, path)) => seed.deserialize(Strict(value, path)),
            None => Err(de::Error::custom(
                "a map value was asked for before its key",
            )),
        }
    }
}
