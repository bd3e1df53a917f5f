//! The model layer: configuration, weights, tokenizer, chat template and the transformer
//! itself (written once against the `Backend` trait, with a hand-written backward).

pub mod adapter;
pub mod config;
pub mod decode;
pub mod chat;
pub mod load;
pub mod tokenizer;
pub mod transformer;
pub mod weights;
