//! Register-window attention (AFM 2025, our reading; see SPEC.md).
//!
//! `R` learned register tokens travel alongside the patch tokens.
//! - In a **window block** every window attends over `[registers; its own tokens]` (the same
//!   register values are prepended to each window); the registers' new value is the mean of
//!   their per-window outputs. Window tokens see only their window and the registers; the
//!   registers see every window. With `two_pass` (the presets) the windows then attend a second
//!   time, over `[registers + their gathered update; own tokens]`, so what one window
//!   contributes reaches every other window within the same block; without it, in the next
//!   block.
//! - In a **global block** the registers join the full sequence: `[registers; all tokens]`.
//!
//! With `R = 0` both reduce exactly to ViTDet window / global attention.

use tch::Tensor;

use crate::attention::Attention;
use crate::error::Result;
use crate::window::{partition, unpartition};

/// Window attention. `x`: normalised tokens `[B, H, W, C]`; `regs`: normalised registers
/// `[B, R, C]` or `None`. Returns the attention outputs `([B, H, W, C], [B, R, C])`.
pub fn window_attention(
    attn: &Attention,
    x: &Tensor,
    regs: Option<&Tensor>,
    window: i64,
    two_pass: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (windows, lay) = partition(x, window)?; // [B * nW, w², C]
    let Some(r) = regs else {
        let o = attn.forward(&windows)?;
        return Ok((unpartition(&o, &lay)?, None));
    };
    let (b, nr, c) = r.size3()?;
    let nwin = lay.windows_per_image();
    let per_window = r
        .f_unsqueeze(1)?
        .f_expand([b, nwin, nr, c], false)?
        .f_reshape([b * nwin, nr, c])?; // [B * nW, R, C]
    let seq = Tensor::f_cat(&[per_window, windows.shallow_clone()], 1)?; // [B * nW, R + w², C]
    let o = attn.forward(&seq)?;
    let l = o.size()[1];
    let reg_out = o
        .f_narrow(1, 0, nr)?
        .f_reshape([b, nwin, nr, c])?
        .f_mean_dim(1, false, None)?; // [B, R, C]
    let tok_out = if two_pass {
        // Pass 2: the windows read the registers after the gather.
        let gathered = r
            .f_add(&reg_out)?
            .f_unsqueeze(1)?
            .f_expand([b, nwin, nr, c], false)?
            .f_reshape([b * nwin, nr, c])?;
        let o2 = attn.forward(&Tensor::f_cat(&[gathered, windows], 1)?)?;
        o2.f_narrow(1, nr, l - nr)?
    } else {
        o.f_narrow(1, nr, l - nr)?
    }; // [B * nW, w², C]
    Ok((unpartition(&tok_out, &lay)?, Some(reg_out)))
}

/// Global attention over `[registers; all tokens]`. Shapes as [`window_attention`].
pub fn global_attention(
    attn: &Attention,
    x: &Tensor,
    regs: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, h, w, c) = x.size4()?;
    let tokens = x.f_reshape([b, h * w, c])?; // [B, HW, C]
    let Some(r) = regs else {
        let o = attn.forward(&tokens)?;
        return Ok((o.f_reshape([b, h, w, c])?, None));
    };
    let nr = r.size()[1];
    let seq = Tensor::f_cat(&[r.shallow_clone(), tokens], 1)?; // [B, R + HW, C]
    let o = attn.forward(&seq)?;
    let reg_out = o.f_narrow(1, 0, nr)?;
    let tok_out = o.f_narrow(1, nr, h * w)?.f_reshape([b, h, w, c])?;
    Ok((tok_out, Some(reg_out)))
}
