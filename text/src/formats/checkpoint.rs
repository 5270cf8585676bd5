//! Safetensors checkpoints: memory-mapped reading (single file or sharded with
//! `model.safetensors.index.json`) and writing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};
use crate::weights::WeightMap;

/// The safetensors files of a model directory, in load order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    if !dir.exists() {
        return Err(TextError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| TextError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TextError::checkpoint(&index, format!("bad JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| TextError::checkpoint(&index, "no \"weight_map\" object"))?;
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                TextError::checkpoint(&index, format!("weight_map entry '{name}' is not a string"))
            })?;
            files.insert(file.to_string());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(TextError::checkpoint(
        dir,
        "no model.safetensors or model.safetensors.index.json in this directory",
    ))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Read every tensor of one safetensors file (CPU copies in their stored dtype). Errors are
/// one line naming the file (never the library's debug text).
pub fn read_safetensors_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| TextError::io(path, e))?;
    // SAFETY: the file is opened read-only; we copy every tensor out before dropping the map.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TextError::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| {
        TextError::checkpoint(
            path,
            format!("not a valid safetensors file ({e}); truncated or corrupt?"),
        )
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            TextError::checkpoint(
                path,
                format!("tensor '{name}' has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.push((name, t));
    }
    Ok(out)
}

/// Read one safetensors file into `map` (tensors stay in their stored dtype on the CPU).
pub fn read_safetensors_into(path: &Path, map: &mut WeightMap) -> Result<()> {
    let tensors = read_safetensors_file(path)?;
    let idx = map.add_file(path);
    for (name, t) in tensors {
        map.insert(name, t, idx);
    }
    Ok(())
}

/// How a model directory stores its tensors: the bytes of its safetensors files and a count of
/// tensors per encoding (`Q4_1 blocks`, `packed codes`, `F32`, …), read from the headers.
pub fn stored_encodings(dir: &Path) -> Result<(u64, BTreeMap<String, usize>)> {
    let mut bytes = 0;
    let mut count = BTreeMap::new();
    for path in safetensors_files(dir)? {
        let file = std::fs::File::open(&path).map_err(|e| TextError::io(&path, e))?;
        bytes += file.metadata().map_err(|e| TextError::io(&path, e))?.len();
        // SAFETY: read-only map, dropped before returning; only the header is parsed.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TextError::io(&path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            TextError::checkpoint(
                &path,
                format!("not a valid safetensors file ({e}); truncated or corrupt?"),
            )
        })?;
        for (name, info) in meta.tensors() {
            let block = crate::quant::ggml::BLOCK_TYPES
                .iter()
                .find(|&&ty| name.ends_with(&format!(".{}", crate::quant::ggml::suffix(ty))));
            let enc = match block {
                Some(ty) => format!("{} blocks", ty.name()),
                None if name.ends_with(".qcodes") => "packed codes".to_string(),
                None if name.ends_with(".qlut") || name.ends_with(".qscale") => continue,
                None => format!("{:?}", info.dtype),
            };
            *count.entry(enc).or_insert(0) += 1;
        }
    }
    Ok((bytes, count))
}

/// Load every safetensors file of a model directory (or one file).
pub fn load_weights(dir: &Path, device: Device, kind: Kind) -> Result<WeightMap> {
    let mut map = WeightMap::new(device, kind);
    for f in safetensors_files(dir)? {
        read_safetensors_into(&f, &mut map)?;
    }
    Ok(map)
}

/// Write named tensors to one safetensors file (contiguous CPU copies), with metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    // Contiguous CPU tensors (no copy when they already are), viewed in place: writing a
    // model needs no second copy of it in memory.
    let mut owned: BTreeMap<String, (Dtype, Vec<usize>, Tensor)> = BTreeMap::new();
    for (name, t) in tensors {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            TextError::checkpoint(
                path,
                format!("cannot store dtype {:?} of '{name}'", t.kind()),
            )
        })?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.insert(name.clone(), (dtype, shape, t));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, (d, s, t))| {
            let len = t.numel() * t.kind().elt_size_in_bytes();
            let bytes: &[u8] = if len == 0 {
                &[]
            } else {
                // SAFETY: `t` is a contiguous CPU tensor of `len` bytes, owned by `owned`,
                // which outlives `views` and is not written while they exist.
                unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
            };
            safetensors::tensor::TensorView::new(*d, s.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| TextError::checkpoint(path, format!("tensor '{n}': {e}")))
        })
        .collect::<Result<_>>()?;
    // Write to a temporary name, then rename: a crash never leaves a half-written checkpoint.
    crate::atomic_write::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp)
            .map_err(|e| TextError::checkpoint(path, e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let b = Tensor::from_slice(&[7i64, 8]);
        write_safetensors(
            &path,
            &[("a".into(), a.copy()), ("b".into(), b.copy())],
            None,
        )
        .unwrap();
        let map = load_weights(dir.path(), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(map.len(), 2);
        let got = map.get("a", &[2, 3]).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(got.flatten(0, -1)).unwrap(),
            vec![1., 2., 3., 4., 5., 6.]
        );
        let err = map.get("a", &[3, 2]).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("shape [2, 3]"),
            "{err}"
        );
        let err = map.get("zzz", &[1]).unwrap_err().to_string();
        assert!(err.contains("missing tensor 'zzz'"), "{err}");

        // Truncate the file: a clear error naming it.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let err = load_weights(dir.path(), Device::Cpu, Kind::Float)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn missing_dir_is_an_error() {
        let err = load_weights(Path::new("/nonexistent/model"), Device::Cpu, Kind::Float)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/model"), "{err}");
    }
}
