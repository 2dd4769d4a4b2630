//! The linear layer of the decoder: a frozen or trained weight, an optional bias, and an
//! optional LoRA adapter or sparse delta; alone or as a group sharing one input.

use crate::ops;
use crate::peft::LoraAdapter;
use crate::{DType, Device, Result, Tensor};

/// `y = x·Wᵀ (+ b)`, W `[out, in]`, plus a LoRA term when an adapter is attached.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// The trained sparse delta of sparse fine-tuning (`W + scatter(δ)`).
    pub sparse: Option<SparseDelta>,
}

/// Values δ at sorted flat indices of a linear's `[out, in]` weight.
#[derive(Clone)]
pub struct SparseDelta {
    pub indices: std::sync::Arc<crate::kernels::sparse::SparseIndices>,
    /// `[nnz]`, f32.
    pub values: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, lora: None, sparse: None }
    }

    /// `dropout_seed` switches the LoRA dropout on (training); `None` is evaluation.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.forward_remade(x, dropout_seed, None)
    }

    /// [`Linear::forward`] whose backward makes x again with `remake` where its adapter needs
    /// x, instead of keeping it (`ops::linear_group_remade`).
    pub fn forward_remade(&self, x: &Tensor, dropout_seed: Option<u64>, remake: Option<ops::Remake>) -> Result<Tensor> {
        if let Some(sp) = &self.sparse {
            if self.lora.is_some() {
                return Err(crate::Error::InvalidArgument("a linear cannot carry both a LoRA adapter and a sparse delta".into()));
            }
            return ops::sparse_linear(x, &self.weight, self.bias.as_ref(), &sp.indices, &sp.values);
        }
        if self.lora.is_some() {
            return Ok(ops::linear_group_remade(x, &[self.part(dropout_seed)], remake)?.remove(0));
        }
        // A frozen weight on a GPU runs the linear kernels: the bias added in the GEMM's
        // epilogue, an NF4 weight dequantized in the tile loads. So does a frozen NF4 weight on
        // the CPU, whose products decode W inside (`matmul` would decode it whole, transposed,
        // on every call: 2 of every 7 linears of a decoding step did before), and a frozen
        // bf16 weight on the CPU (`Llama::matrices_in_bf16`), which they read widened.
        let frozen = !self.weight.is_tracked() && self.bias.as_ref().is_none_or(|b| !b.is_tracked());
        if frozen && (self.weight.device() != Device::Cpu || matches!(self.weight.dtype(), DType::NF4 | DType::BF16)) {
            return Ok(ops::linear_group(x, &[self.part(None)])?.remove(0));
        }
        let y = ops::matmul(x, &self.weight, false, true)?;
        match &self.bias {
            Some(b) => ops::add(&y, b),
            None => Ok(y),
        }
    }
}

impl Linear {
    fn part(&self, dropout_seed: Option<u64>) -> ops::LinearPart<'_> {
        let lora = self.lora.as_ref();
        ops::LinearPart {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            lora: lora.map(|l| (&l.a, &l.b, l.scale)),
            dropout: lora.and_then(|l| dropout_seed.filter(|_| l.dropout > 0.0).map(|seed| ops::Dropout { p: l.dropout, seed })),
        }
    }

    /// Several linears of the same input as one op (side by side on the CPU; one tape entry,
    /// whose backward sums dX in part order and makes x again at most once); one at a time
    /// when a base weight is itself trained (full fine-tuning) or carries a sparse delta,
    /// since the group op treats W and the bias as frozen and knows no deltas.
    pub fn forward_group(linears: &[(&Linear, Option<u64>)], x: &Tensor) -> Result<Vec<Tensor>> {
        Self::forward_group_remade(linears, x, None)
    }

    /// [`Linear::forward_group`] whose backward makes x again with `remake` where an adapter
    /// needs it (see [`Linear::forward_remade`]).
    pub fn forward_group_remade(linears: &[(&Linear, Option<u64>)], x: &Tensor, remake: Option<ops::Remake>) -> Result<Vec<Tensor>> {
        let frozen = linears.iter().all(|(l, _)| l.sparse.is_none() && !l.weight.is_tracked() && l.bias.as_ref().is_none_or(|b| !b.is_tracked()));
        if !frozen {
            return linears.iter().map(|(l, seed)| l.forward_remade(x, *seed, remake.clone())).collect();
        }
        let parts: Vec<ops::LinearPart<'_>> = linears.iter().map(|(l, seed)| l.part(*seed)).collect();
        ops::linear_group_remade(x, &parts, remake)
    }
}
