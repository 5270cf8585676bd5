//! PyTorch `.pt` checkpoints (`torch.save` of a state dict), read natively and safely.
//!
//! The file is a zip archive (entries stored, not compressed): `NAME/data.pkl` holds a pickle
//! of the state dict and `NAME/data/KEY` the raw bytes of each tensor storage. The pickle is
//! *interpreted*, never executed: a small stack machine understands the opcodes `torch.save`
//! writes (protocols 2–4) and only these globals — `collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the `torch.*Storage`
//! dtype classes. Any other opcode or global is an error naming it, so a checkpoint cannot run
//! code. Storages are read from a memory map of the file, one tensor at a time (a 12 GB file is
//! never read into memory at once); each tensor is copied out of the map in its stored dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::error::{Result, TextError};

/// A value on the pickle machine's stack.
#[derive(Debug, Clone)]
enum Value {
    /// None, a bool or a float: their values are never needed, only their kind.
    Scalar(&'static str),
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Dicts (and OrderedDicts), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An allowed global (module, name).
    Global(&'static str),
    /// A storage reference from a persistent id: dtype, archive key, element count.
    Storage {
        kind: Kind,
        key: String,
    },
    /// A tensor view of a storage.
    Tensor(TensorRef),
    Mark,
}

/// A tensor as the pickle describes it; its bytes are read later.
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub kind: Kind,
    /// Storage key: the archive entry `data/KEY`.
    pub key: String,
    /// Offset into the storage, in elements.
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// The globals a state dict may name (everything else is refused).
const GLOBALS: &[(&str, &str, &str)] = &[
    ("collections", "OrderedDict", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2", "rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter", "rebuild_parameter"),
    ("torch", "FloatStorage", "FloatStorage"),
    ("torch", "DoubleStorage", "DoubleStorage"),
    ("torch", "HalfStorage", "HalfStorage"),
    ("torch", "BFloat16Storage", "BFloat16Storage"),
    ("torch", "LongStorage", "LongStorage"),
    ("torch", "IntStorage", "IntStorage"),
    ("torch", "ShortStorage", "ShortStorage"),
    ("torch", "CharStorage", "CharStorage"),
    ("torch", "ByteStorage", "ByteStorage"),
    ("torch", "BoolStorage", "BoolStorage"),
];

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// The pickle interpreter over one `data.pkl`.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("the pickle ends in the middle of an instruction")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL name")?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| "GLOBAL name is not UTF-8")?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> std::result::Result<Value, String> {
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }
    /// Everything above the topmost mark (the mark is removed).
    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn string(&mut self, n: usize) -> std::result::Result<Value, String> {
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .map_err(|_| "a string is not UTF-8")?
                .to_string(),
        ))
    }
    fn global(module: &str, name: &str) -> std::result::Result<Value, String> {
        GLOBALS
            .iter()
            .find(|(m, n, _)| *m == module && *n == name)
            .map(|(_, _, id)| Value::Global(id))
            .ok_or_else(|| {
                format!("refusing the pickle global {module}.{name} (a state dict holds only tensors; nothing in a checkpoint is executed)")
            })
    }

    fn run(mut self) -> std::result::Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: length of the next frame, not needed
                }
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::Scalar("None")),
                0x88 => self.stack.push(Value::Scalar("a bool")),
                0x89 => self.stack.push(Value::Scalar("a bool")),
                b'(' => self.stack.push(Value::Mark),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(i64::from(v)))
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err(format!("a {n}-byte integer is too large"));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= i64::from(byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Scalar("a float"))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'U' => {
                    let n = usize::from(self.u8()?);
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'q' => {
                    let k = u32::from(self.u8()?);
                    let top = self.stack.last().ok_or("BINPUT on an empty stack")?.clone();
                    self.memo.insert(k, top);
                }
                b'r' => {
                    let k = self.u32()?;
                    let top = self.stack.last().ok_or("BINPUT on an empty stack")?.clone();
                    self.memo.insert(k, top);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let top = self.stack.last().ok_or("MEMOIZE on an empty stack")?.clone();
                    self.memo.insert(k, top);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        u32::from(self.u8()?)
                    } else {
                        self.u32()?
                    };
                    let v = self
                        .memo
                        .get(&k)
                        .ok_or_else(|| format!("memo entry {k} is not defined"))?
                        .clone();
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Self::global(&module, &name)?);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Self::global(&m, &n)?),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_storage(pid)?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(reduce(f, args)?);
                }
                b'b' => {
                    // BUILD: an OrderedDict's state (`_metadata`) or a Parameter's; not needed.
                    let _state = self.pop()?;
                    if self.stack.is_empty() {
                        return Err("BUILD on an empty stack".into());
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::Dict(d)) => d.push((k, v)),
                        _ => return Err("SETITEM on something that is not a dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd number of items".into());
                    }
                    let Some(Value::Dict(d)) = self.stack.last_mut() else {
                        return Err("SETITEMS on something that is not a dict".into());
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.push(v),
                        _ => return Err("APPEND on something that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
                        _ => return Err("APPENDS on something that is not a list".into()),
                    }
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {at} (only the opcodes of a torch.save'd state dict are read)"
                    ))
                }
            }
        }
    }
}

/// `('storage', torch.FloatStorage, '0', 'cpu', numel)` → a storage reference.
fn persistent_storage(pid: Value) -> std::result::Result<Value, String> {
    let Value::Tuple(t) = pid else {
        return Err("a persistent id that is not a tuple".into());
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(cls), Value::Str(key), _location, _numel]
            if tag == "storage" =>
        {
            let kind = storage_kind(cls).ok_or_else(|| format!("{cls} is not a storage type"))?;
            if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
                return Err(format!("bad storage key {key:?}"));
            }
            Ok(Value::Storage {
                kind,
                key: key.clone(),
            })
        }
        _ => Err("a persistent id that is not a tensor storage".into()),
    }
}

fn int_tuple(v: &Value, what: &str) -> std::result::Result<Vec<i64>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i),
                _ => Err(format!("tensor {what} holds a non-integer")),
            })
            .collect(),
        _ => Err(format!("tensor {what} is not a tuple")),
    }
}

/// Apply an allowed callable.
fn reduce(f: Value, args: Value) -> std::result::Result<Value, String> {
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match f {
        Value::Global("OrderedDict") => Ok(Value::Dict(Vec::new())),
        Value::Global("rebuild_tensor") => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            let (
                Some(Value::Storage { kind, key }),
                Some(Value::Int(offset)),
                Some(size),
                Some(stride),
            ) = (args.first(), args.get(1), args.get(2), args.get(3))
            else {
                return Err("_rebuild_tensor_v2 with unexpected arguments".into());
            };
            let size = int_tuple(size, "size")?;
            let stride = int_tuple(stride, "stride")?;
            if size.len() != stride.len() || *offset < 0 {
                return Err("tensor size, stride and offset do not agree".into());
            }
            Ok(Value::Tensor(TensorRef {
                kind: *kind,
                key: key.clone(),
                offset: *offset,
                size,
                stride,
            }))
        }
        Value::Global("rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        Value::Global(g) => Err(format!("{g} cannot be called")),
        _ => Err("REDUCE on something that is not a callable".into()),
    }
}

/// An open `.pt` checkpoint: the tensor table from its pickle, the storages in a memory map.
pub struct PtFile {
    pub path: PathBuf,
    /// Tensor names in the file's order, with their description.
    pub tensors: Vec<(String, TensorRef)>,
    /// Storage key → (byte offset in the file, byte length).
    storages: HashMap<String, (u64, u64)>,
    mmap: memmap2::Mmap,
}

impl PtFile {
    pub fn open(path: &Path) -> Result<Self> {
        let err = |m: String| TextError::checkpoint(path, m);
        let file = std::fs::File::open(path).map_err(|e| TextError::io(path, e))?;
        // SAFETY: the map is read-only; tensors are copied out of it before it is dropped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TextError::io(path, e))?;
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&mmap[..])).map_err(|e| {
            err(format!(
                "not a readable zip archive: truncated, or not a torch.save checkpoint ({e})"
            ))
        })?;
        let mut pickle: Option<(u64, u64)> = None;
        let mut storages = HashMap::new();
        for i in 0..zip.len() {
            let f = zip
                .by_index_raw(i)
                .map_err(|e| err(format!("zip entry {i}: {e}")))?;
            let name = f.name().to_string();
            let (start, len) = (f.data_start(), f.compressed_size());
            if start.checked_add(len).is_none_or(|e| e > mmap.len() as u64) {
                return Err(err(format!(
                    "entry {name} runs past the end of the file; truncated?"
                )));
            }
            let stored = f.compression() == zip::CompressionMethod::Stored;
            // `archive/data.pkl`, `archive/data/KEY` (any top folder name).
            let mut parts = name.splitn(2, '/');
            let (_top, rest) = (parts.next(), parts.next().unwrap_or(""));
            if rest == "data.pkl" {
                if !stored {
                    return Err(err("data.pkl is compressed".into()));
                }
                pickle = Some((start, len));
            } else if let Some(key) = rest.strip_prefix("data/") {
                if !stored {
                    return Err(err(format!("storage {key} is compressed")));
                }
                storages.insert(key.to_string(), (start, len));
            }
        }
        let (start, len) = pickle.ok_or_else(|| err("no data.pkl in the archive".into()))?;
        let bytes = &mmap[start as usize..(start + len) as usize];
        let root = Machine {
            data: bytes,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
        .run()
        .map_err(|m| err(format!("data.pkl: {m}")))?;
        let Value::Dict(entries) = root else {
            return Err(err(
                "data.pkl does not hold a state dict (a dict of tensors)".into(),
            ));
        };
        let mut tensors = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Value::Str(name) = k else {
                return Err(err("a state-dict key is not a string".into()));
            };
            match v {
                Value::Tensor(t) => tensors.push((name, t)),
                other => {
                    return Err(err(format!(
                        "state-dict entry '{name}' is not a tensor ({})",
                        value_kind(&other)
                    )))
                }
            }
        }
        Ok(PtFile {
            path: path.to_path_buf(),
            tensors,
            storages,
            mmap,
        })
    }

    /// Copy one tensor out of the map (in its stored dtype, contiguous, on the CPU).
    pub fn tensor(&self, t: &TensorRef) -> Result<Tensor> {
        let err = |m: String| TextError::checkpoint(&self.path, m);
        let &(start, len) = self
            .storages
            .get(&t.key)
            .ok_or_else(|| err(format!("storage {} is missing from the archive", t.key)))?;
        let elt = t.kind.elt_size_in_bytes() as u64;
        let numel = len / elt;
        // The highest element the view touches must lie inside the storage.
        let mut last = t.offset;
        for (&s, &st) in t.size.iter().zip(&t.stride) {
            if s == 0 {
                last = -1;
                break;
            }
            last = last
                .checked_add(
                    (s - 1)
                        .checked_mul(st)
                        .ok_or_else(|| err("overflow".into()))?,
                )
                .ok_or_else(|| err("overflow".into()))?;
        }
        if last >= 0 && last as u64 >= numel {
            return Err(err(format!(
                "a tensor of storage {} reads past its end ({numel} elements); truncated or corrupt?",
                t.key
            )));
        }
        // Only the bytes this view covers are copied (a tensor may view part of a storage),
        // in chunks whose mapped pages are handed back as soon as they are copied: loading a
        // checkpoint keeps one copy of it resident, not two, even for a 1.2 GB embedding (the
        // page cache still has the pages for a re-read).
        let elt_us = elt as usize;
        let (first, count) = if last < 0 {
            (0usize, 0usize)
        } else {
            (t.offset as usize, (last - t.offset) as usize + 1)
        };
        let lo = start as usize + first * elt_us;
        let nbytes = count * elt_us;
        let flat = Tensor::f_empty([count as i64], (t.kind, tch::Device::Cpu))?;
        let dst = flat.data_ptr() as *mut u8;
        const CHUNK: usize = 64 << 20;
        let mut done = 0;
        while done < nbytes {
            let n = CHUNK.min(nbytes - done);
            let src = &self.mmap[lo + done..lo + done + n];
            // SAFETY: `flat` is a fresh contiguous CPU tensor of exactly `nbytes` bytes, and
            // `src` lies inside the map (checked against the storage's extent above).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(done), n) };
            #[cfg(unix)]
            // SAFETY: a read-only file mapping, and no slice of this range is alive: after
            // MADV_DONTNEED a later read faults the file's pages back in.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo + done, n)
            };
            done += n;
        }
        // A view with the usual strides is already contiguous (no further copy).
        Ok(flat
            .f_as_strided(t.size.as_slice(), t.stride.as_slice(), Some(0))?
            .f_contiguous()?)
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Scalar(k) => k,
        Value::Int(_) => "an int",
        Value::Str(_) => "a string",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Global(_) => "a class",
        Value::Storage { .. } => "a storage",
        Value::Tensor(_) => "a tensor",
        Value::Mark => "a mark",
    }
}
