//! Writing PyTorch `.pt` state dicts: what `torch.save(state_dict, path)` writes, so that
//! `torch.load` (with `weights_only=True`, its default) and tamm's `load_state_dict` read it.
//!
//! The archive is a zip of stored entries under one top folder: `archive/data.pkl` (a protocol-2
//! pickle of an `OrderedDict` name → `torch._utils._rebuild_tensor_v2(storage, 0, size, stride,
//! False, OrderedDict())`, each storage a persistent id `('storage', torch.FloatStorage, key,
//! 'cpu', numel)`), `archive/data/KEY` (the little-endian bytes of each tensor, 64-byte aligned
//! like torch's own writer), `archive/byteorder` and `archive/version`. Only the globals our
//! reader ([`crate::pt`]) accepts are written, so the two round-trip.

use std::io::Write as _;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Result, TextError};

/// The storage class torch names for a dtype.
fn storage_class(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "FloatStorage",
        Kind::Double => "DoubleStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Int16 => "ShortStorage",
        Kind::Int8 => "CharStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        _ => return None,
    })
}

/// A protocol-2 pickle, written opcode by opcode.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if let Ok(v) = i32::try_from(v) {
            self.0.push(b'J');
            self.0.extend_from_slice(&v.to_le_bytes());
        } else {
            // LONG1: n little-endian two's-complement bytes.
            self.0.extend_from_slice(&[0x8a, 8]);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn int_tuple(&mut self, v: &[i64]) {
        self.0.push(b'(');
        for &x in v {
            self.int(x);
        }
        self.0.push(b't');
    }
    /// `collections.OrderedDict()`
    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R");
    }
}

/// Write `tensors` (name → tensor, any device; copied to the CPU, contiguous) to `path` as
/// `torch.save` of an `OrderedDict` would, atomically (a temporary file renamed over `path`).
pub fn write_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut p = Pickle::default();
    p.0.extend_from_slice(&[0x80, 2]);
    p.empty_ordered_dict();
    p.0.push(b'(');
    let mut storages = Vec::with_capacity(tensors.len());
    for (key, (name, t)) in tensors.iter().enumerate() {
        let class = storage_class(t.kind()).ok_or_else(|| {
            TextError::checkpoint(
                path,
                format!("'{name}': dtype {:?} cannot be saved", t.kind()),
            )
        })?;
        let t = t
            .f_detach()?
            .f_to_device(tch::Device::Cpu)?
            .f_contiguous()?;
        let size = t.size();
        let mut stride = vec![1i64; size.len()];
        for i in (0..size.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * size[i + 1].max(1);
        }
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'(');
        // The storage, as a persistent id.
        p.0.push(b'(');
        p.str("storage");
        p.global("torch", class);
        p.str(&key.to_string());
        p.str("cpu");
        p.int(t.numel() as i64);
        p.0.extend_from_slice(b"tQ");
        p.int(0);
        p.int_tuple(&size);
        p.int_tuple(&stride);
        p.0.push(0x89); // requires_grad = False
        p.empty_ordered_dict(); // backward hooks
        p.0.extend_from_slice(b"tR");
        storages.push(t);
    }
    p.0.extend_from_slice(b"u.");

    crate::atomic_write::write_atomic_with(path, |tmp| -> Result<()> {
        let io = |e: std::io::Error| TextError::io(path, e);
        let zerr = |e: zip::result::ZipError| TextError::checkpoint(path, e.to_string());
        let file = std::fs::File::create(tmp).map_err(io)?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let opts = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        zip.start_file_aligned("archive/data.pkl", opts, 64)
            .map_err(zerr)?;
        zip.write_all(&p.0).map_err(io)?;
        zip.start_file_aligned("archive/byteorder", opts, 64)
            .map_err(zerr)?;
        zip.write_all(b"little").map_err(io)?;
        for (key, t) in storages.iter().enumerate() {
            zip.start_file_aligned(format!("archive/data/{key}"), opts, 64)
                .map_err(zerr)?;
            let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut bytes, t.numel())?;
            zip.write_all(&bytes).map_err(io)?;
        }
        zip.start_file_aligned("archive/version", opts, 64)
            .map_err(zerr)?;
        zip.write_all(b"3\n").map_err(io)?;
        let mut w = zip.finish().map_err(zerr)?;
        w.flush().map_err(io)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pt::PtFile;

    #[test]
    fn written_state_dicts_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pt");
        let a = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).reshape([3, 4]);
        // A transposed view is written contiguous; a scalar and bf16 keep their shape and kind.
        let b = a.transpose(0, 1).to_kind(Kind::BFloat16);
        let c = Tensor::from(7i64);
        let tensors = vec![
            ("a.weight".to_string(), a.shallow_clone()),
            ("b".to_string(), b.shallow_clone()),
            ("c".to_string(), c.shallow_clone()),
        ];
        write_state_dict(&path, &tensors).unwrap();
        let pt = PtFile::open(&path).unwrap();
        let names: Vec<&str> = pt.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.weight", "b", "c"]);
        for ((_, r), (_, want)) in pt.tensors.iter().zip(&tensors) {
            let got = pt.tensor(r).unwrap();
            assert_eq!(got.kind(), want.kind());
            assert_eq!(got.size(), want.size());
            assert!(got.equal(want));
        }
    }
}
