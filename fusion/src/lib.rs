//! afm-fusion: the vision→language adapter, the vision-language model and `describe`.
