//! Window partitioning with padding (ViTDet / HF `window_partition`, `window_unpartition`).
//! Grids that don't divide by the window are zero-padded at the bottom and right; as in ViTDet,
//! padded tokens take part in the window's attention as keys and are dropped afterwards.

use tch::Tensor;

use crate::error::Result;

/// How a `[B, H, W, C]` grid was cut into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLayout {
    pub batch: i64,
    pub height: i64,
    pub width: i64,
    pub window: i64,
    pub padded_height: i64,
    pub padded_width: i64,
}

impl WindowLayout {
    pub fn new(batch: i64, height: i64, width: i64, window: i64) -> Self {
        let ph = height + (window - height % window) % window;
        let pw = width + (window - width % window) % window;
        Self {
            batch,
            height,
            width,
            window,
            padded_height: ph,
            padded_width: pw,
        }
    }

    /// Windows per image (row-major).
    pub fn windows_per_image(&self) -> i64 {
        (self.padded_height / self.window) * (self.padded_width / self.window)
    }
}

/// `[B, H, W, C]` → `[B * nW, window², C]` (windows row-major within each image).
pub fn partition(x: &Tensor, window: i64) -> Result<(Tensor, WindowLayout)> {
    let (b, h, w, c) = x.size4()?;
    let lay = WindowLayout::new(b, h, w, window);
    let x = if lay.padded_height != h || lay.padded_width != w {
        x.f_constant_pad_nd([0, 0, 0, lay.padded_width - w, 0, lay.padded_height - h])?
    } else {
        x.shallow_clone()
    };
    let (nh, nw) = (lay.padded_height / window, lay.padded_width / window);
    let out = x
        .f_reshape([b, nh, window, nw, window, c])?
        .f_permute([0, 1, 3, 2, 4, 5])?
        .f_reshape([b * nh * nw, window * window, c])?;
    Ok((out, lay))
}

/// `[B * nW, window², C]` → `[B, H, W, C]` (padding removed).
pub fn unpartition(windows: &Tensor, lay: &WindowLayout) -> Result<Tensor> {
    let c = windows.size().last().copied().unwrap_or(0);
    let (nh, nw) = (
        lay.padded_height / lay.window,
        lay.padded_width / lay.window,
    );
    let x = windows
        .f_reshape([lay.batch, nh, nw, lay.window, lay.window, c])?
        .f_permute([0, 1, 3, 2, 4, 5])?
        .f_reshape([lay.batch, lay.padded_height, lay.padded_width, c])?;
    if lay.padded_height != lay.height || lay.padded_width != lay.width {
        Ok(x.f_narrow(1, 0, lay.height)?.f_narrow(2, 0, lay.width)?)
    } else {
        Ok(x)
    }
}
