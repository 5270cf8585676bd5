//! GGUF reading, written by us: header, metadata, tensor infos, and dequantisation of
//! F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K to f32 (block layouts as in ggml).
//!
//! Every error names the file and what is wrong with it (truncated header, unknown type, a
//! tensor running past the end of the file...).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Result, TextError};

const MAGIC: &[u8; 4] = b"GGUF";
const QK_K: usize = 256;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types we can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }
}

/// A tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (the reverse of the PyTorch shape).
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
    /// PyTorch-order shape.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    mmap: memmap2::Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> TextError {
        TextError::gguf(self.path, format!("{msg} (at byte {})", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "truncated: needs {n} more bytes but the file has {}",
                    self.buf.len() - self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > self.buf.len() as u64 {
            return Err(self.err(format!("string length {n} exceeds the file size")));
        }
        let bytes = self.take(n as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte: a bigger count is a corrupt header.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(self.err(format!("array of {n} elements exceeds the file size")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Open and parse the header; tensor data stays mapped until dequantised.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| TextError::io(path, e))?;
        if file
            .metadata()
            .map_err(|e| TextError::io(path, e))?
            .is_dir()
        {
            return Err(TextError::gguf(
                path,
                "is a directory, expected a .gguf file",
            ));
        }
        // SAFETY: read-only mapping; tensors are copied out when dequantised.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TextError::io(path, e))?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        if c.take(4)
            .map_err(|_| TextError::gguf(path, "file too short to be GGUF"))?
            != MAGIC
        {
            return Err(TextError::gguf(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        if n_tensors > 1_000_000 || n_kv > 1_000_000 {
            return Err(c.err(format!(
                "implausible header: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd == 0 || nd > 4 {
                return Err(c.err(format!("tensor '{name}' has {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let type_id = c.u32()?;
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let me = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            mmap,
        };
        // Every tensor must lie inside the file.
        for t in &me.tensors {
            me.tensor_bytes(t)?;
        }
        Ok(me)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required metadata value.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| TextError::gguf(&self.path, format!("missing metadata key '{key}'")))
    }

    /// The tensor's type and its bytes, checked to lie inside the file.
    fn tensor_bytes(&self, t: &TensorInfo) -> Result<(GgmlType, &[u8])> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| {
            TextError::gguf(
                &self.path,
                format!(
                    "tensor '{}' has unsupported ggml type {}",
                    t.name, t.type_id
                ),
            )
        })?;
        let (bs, bb) = ty.block();
        let n = t.numel();
        if !n.is_multiple_of(bs as u64) {
            return Err(TextError::gguf(
                &self.path,
                format!(
                    "tensor '{}' has {n} elements, not a multiple of the {} block {bs}",
                    t.name,
                    ty.name()
                ),
            ));
        }
        let nbytes = n / bs as u64 * bb as u64;
        let start = self.data_start as u64 + t.offset;
        let end = start.saturating_add(nbytes);
        if end > self.mmap.len() as u64 {
            return Err(TextError::gguf(
                &self.path,
                format!(
                    "tensor '{}' runs past the end of the file (needs bytes {start}..{end}, file has {}); truncated?",
                    t.name,
                    self.mmap.len()
                ),
            ));
        }
        Ok((ty, &self.mmap[start as usize..end as usize]))
    }

    /// A tensor's type and its bytes as the file stores them.
    pub fn raw_bytes(&self, t: &TensorInfo) -> Result<(GgmlType, &[u8])> {
        self.tensor_bytes(t)
    }

    /// Dequantise a tensor to f32 (row-major, PyTorch-order shape from [`TensorInfo::shape`]).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let (ty, bytes) = self.tensor_bytes(t)?;
        Ok(dequantize(ty, bytes))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantise whole blocks of `ty` (the byte length must be a multiple of the block size).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let (bs, bb) = ty.block();
    let nblocks = bytes.len() / bb;
    let mut out = vec![0f32; nblocks * bs];
    out.par_chunks_mut(bs * 64)
        .zip(bytes.par_chunks(bb * 64))
        .for_each(|(y, x)| dequantize_into(ty, x, y));
    out
}

/// [`dequantize`] on the calling thread into `out` (a row: no thread-pool round trip).
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bs, bb) = ty.block();
    for (yb, xb) in out.chunks_mut(bs).zip(bytes.chunks_exact(bb)) {
        dequantize_block(ty, xb, yb);
    }
}

fn dequantize_block(ty: GgmlType, x: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
        GgmlType::F16 => y[0] = f16_at(x, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([x[0], x[1]]).to_f32(),
        GgmlType::Q8_0 => {
            let d = f16_at(x, 0);
            for (i, v) in y.iter_mut().enumerate() {
                *v = d * (x[2 + i] as i8) as f32;
            }
        }
        GgmlType::Q4_0 => {
            let d = f16_at(x, 0);
            let qs = &x[2..18];
            for j in 0..16 {
                y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
                y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(x, 0);
            let m = f16_at(x, 2);
            let qs = &x[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0F) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q4K => {
            let d = f16_at(x, 0);
            let dmin = f16_at(x, 2);
            let scales = &x[4..16];
            let mut q = &x[16..144];
            let mut yi = 0;
            let mut is = 0;
            for _ in (0..QK_K).step_by(64) {
                let (sc1, m1) = scale_min_k4(is, scales);
                let (sc2, m2) = scale_min_k4(is + 1, scales);
                let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    y[yi + l] = d1 * (q[l] & 0xF) as f32 - mm1;
                    y[yi + 32 + l] = d2 * (q[l] >> 4) as f32 - mm2;
                }
                yi += 64;
                q = &q[32..];
                is += 2;
            }
        }
        GgmlType::Q5K => {
            let d = f16_at(x, 0);
            let dmin = f16_at(x, 2);
            let scales = &x[4..16];
            let qh = &x[16..48];
            let mut ql = &x[48..176];
            let (mut u1, mut u2) = (1u8, 2u8);
            let mut yi = 0;
            let mut is = 0;
            for _ in (0..QK_K).step_by(64) {
                let (sc1, m1) = scale_min_k4(is, scales);
                let (sc2, m2) = scale_min_k4(is + 1, scales);
                let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[yi + l] = d1 * ((ql[l] & 0xF) as i32 + h1) as f32 - mm1;
                    y[yi + 32 + l] = d2 * ((ql[l] >> 4) as i32 + h2) as f32 - mm2;
                }
                yi += 64;
                ql = &ql[32..];
                is += 2;
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        GgmlType::Q6K => {
            let d = f16_at(x, 208);
            let mut ql = &x[0..128];
            let mut qh = &x[128..192];
            let mut sc = &x[192..208];
            let mut yi = 0;
            for _ in (0..QK_K).step_by(128) {
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[yi + l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[yi + l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[yi + l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[yi + l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
                yi += 128;
                ql = &ql[64..];
                qh = &qh[32..];
                sc = &sc[8..];
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` in a K-quant's packed `scales[12]`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
