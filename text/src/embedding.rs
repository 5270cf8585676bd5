//! Token embedding; with tied weights the same matrix is the output head.

use tch::Tensor;

use crate::error::{Result, TextError};
use crate::linear::Linear;
use crate::weights::WeightMap;

#[derive(Debug)]
pub struct Embedding {
    weight: Tensor, // [vocab, hidden]
    vocab: i64,
}

impl Embedding {
    pub fn new(w: &WeightMap, name: &str, vocab: i64, hidden: i64) -> Result<Self> {
        Ok(Self {
            weight: w.get(name, &[vocab, hidden])?,
            vocab,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn num_params(&self) -> i64 {
        self.weight.numel() as i64
    }

    /// The tied output head: a linear layer sharing this matrix's storage.
    pub fn tied_head(&self) -> Linear {
        Linear::from_dense(self.weight.shallow_clone(), None)
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
        Ok(Tensor::f_embedding(&self.weight, ids, -1, false, false)?)
    }
}
