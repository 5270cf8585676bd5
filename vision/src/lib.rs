//! afm-vision: image loading, the three-mode tiler, and register-window ViT encoders.
