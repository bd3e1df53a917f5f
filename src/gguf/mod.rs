//! GGUF reading, dequantization and conversion to a Hugging Face model folder.
