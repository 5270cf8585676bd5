//! afm-fusion: the vision→language adapter, the vision-language model and `describe`.

pub mod caption;
mod font;
pub mod scene;
