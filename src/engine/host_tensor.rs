//! The host-side tensor every checkpoint reader (safetensors, GGUF) hands to the loader.

use anyhow::{Result, anyhow, bail};

/// A tensor on the host, row-major, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Stacks tensors along their first dimension (the rows of a PyTorch weight).
    pub fn concat_rows(parts: Vec<HostTensor>) -> Result<HostTensor> {
        let first = parts.first().ok_or_else(|| anyhow!("nothing to concatenate"))?;
        let tail = first.shape[1..].to_vec();
        let mut rows = 0;
        for p in &parts {
            if p.shape[1..] != tail[..] {
                bail!("cannot stack shapes {:?} and {:?}", first.shape, p.shape);
            }
            rows += p.shape[0];
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.numel()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        let mut shape = vec![rows];
        shape.extend(tail);
        Ok(HostTensor { shape, data })
    }

    /// Swaps the two halves along the first dimension: (a, b) → (b, a).
    pub fn swap_row_halves(mut self) -> Result<HostTensor> {
        if self.shape.is_empty() || !self.shape[0].is_multiple_of(2) {
            bail!("cannot split shape {:?} into two halves", self.shape);
        }
        let half = self.numel() / 2;
        self.data.rotate_left(half);
        Ok(self)
    }
}
