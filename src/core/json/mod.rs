//! Reading `model` out of a JSON request body, push-style: [`scanner::ModelScanner`] takes the
//! body chunk by chunk, validates it as it goes and keeps only the model's bytes, whatever the
//! body's size. Its fast paths: `skip` (whitespace, numbers, plain strings a word at a time)
//! and `vector` (a string's content 16 bytes at a time, with UTF-8 validated in the vector
//! registers).

pub mod scanner;
pub mod skip;
pub mod vector;
