//! Token embedding; with tied weights the same matrix is the output head.

use tch::{Kind, Tensor};

use crate::error::{Result, TextError};
use crate::linear::Linear;
use crate::quant::ggml::GgmlWeight;
use crate::quant::QuantizedWeight;
use crate::weights::WeightMap;

#[derive(Debug)]
enum Table {
    Dense(Tensor), // [vocab, hidden]
    /// Packed codes ([`crate::quant`]): lookups unpack only the rows they need.
    Quantized(QuantizedWeight, Kind),
    /// GGUF blocks ([`crate::quant::ggml`]): lookups dequantise only the rows they need.
    Ggml(GgmlWeight, Kind),
}

#[derive(Debug)]
pub struct Embedding {
    table: Table,
    vocab: i64,
    hidden: i64,
}

impl Embedding {
    pub fn new(w: &WeightMap, name: &str, vocab: i64, hidden: i64) -> Result<Self> {
        let table = match QuantizedWeight::from_map(w, name, vocab, hidden)? {
            Some(q) => Table::Quantized(q, w.kind()),
            None => match GgmlWeight::from_map(w, name, vocab, hidden)? {
                Some(g) => Table::Ggml(g, w.kind()),
                None => Table::Dense(w.get(name, &[vocab, hidden])?),
            },
        };
        Ok(Self {
            table,
            vocab,
            hidden,
        })
    }

    /// The dense `[vocab, hidden]` matrix (`None` when stored quantized).
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.table {
            Table::Dense(t) => Some(t),
            Table::Quantized(..) | Table::Ggml(..) => None,
        }
    }

    /// The quantized matrix, if stored so.
    pub fn quantized(&self) -> Option<&QuantizedWeight> {
        match &self.table {
            Table::Quantized(q, _) => Some(q),
            Table::Dense(_) | Table::Ggml(..) => None,
        }
    }

    pub fn num_params(&self) -> i64 {
        self.vocab * self.hidden
    }

    /// The tied output head: a linear layer sharing this matrix's storage.
    pub fn tied_head(&self) -> Linear {
        match &self.table {
            Table::Dense(t) => Linear::from_dense(t.shallow_clone(), None),
            Table::Quantized(q, kind) => Linear::from_quantized(q.shallow_clone(), None, *kind),
            Table::Ggml(g, kind) => Linear::from_ggml(g.shallow_clone(), None, *kind),
        }
    }

    // ids: [batch, seq] (int64) → [batch, seq, hidden]
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (min, max) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
        if min < 0 || max >= self.vocab {
            return Err(TextError::InvalidArgument(format!(
                "token id out of range: ids span {min}..={max} but the vocabulary has {} entries",
                self.vocab
            )));
        }
        match &self.table {
            Table::Dense(t) => Ok(Tensor::f_embedding(t, ids, -1, false, false)?),
            Table::Quantized(q, kind) => q.rows_of(ids, *kind),
            Table::Ggml(g, kind) => g.rows_of(ids, *kind),
        }
    }
}
