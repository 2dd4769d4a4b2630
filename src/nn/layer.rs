//! One decoder layer of the Llama-family model (`nn::llama`): attention and MLP blocks, each
//! pre-normed (and with Gemma 3 post-normed) with a residual, run straight or under
//! `ops::checkpoint`, and what every layer of one forward shares (`LayerCtx`).

use crate::ops::{self, AttentionMask};
use crate::{Result, Tensor};

use super::linear::Linear;

/// `rmsnorm(x, w)` made again, untracked, for a linear's backward (`ops::linear_group_remade`).
fn remade_rmsnorm(x: &Tensor, w: &Tensor, eps: f32) -> ops::Remake {
    let (x, w) = (ops::saved(x), ops::saved(w));
    std::sync::Arc::new(move || ops::rmsnorm(&x, &w, eps))
}

#[derive(Clone)]
pub struct Layer {
    pub input_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Qwen3's RMSNorm weights (`[head_dim]`) over each head of q and of k, before RoPE.
    pub qk_norm: Option<QkNorm>,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma 3's `pre_feedforward_layernorm`).
    pub post_norm: Tensor,
    /// Gemma 3's norms of the attention and MLP outputs before their residual adds
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub out_norms: Option<OutNorms>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// Whether RoPE rotates q and k (not in SmolLM3's NoPE layers: attention sees no positions
    /// there but the causal order).
    pub rope: bool,
    /// Whether attention looks through the sliding window (Mistral's layers, Gemma 3's
    /// `sliding_attention` ones, which also rotate by their own RoPE base).
    pub windowed: bool,
}

/// The norms of a layer's block outputs (Gemma 3's sandwich).
#[derive(Clone)]
pub struct OutNorms {
    pub attn: Tensor,
    pub mlp: Tensor,
}

/// The per-head norms of q and k (`self_attn.q_norm`, `self_attn.k_norm`).
#[derive(Clone)]
pub struct QkNorm {
    pub q: Tensor,
    pub k: Tensor,
}

/// What every decoder layer of one forward shares.
#[derive(Clone)]
pub(super) struct LayerCtx {
    pub(super) b: usize,
    pub(super) t: usize,
    /// (H, G, D)
    pub(super) heads: (usize, usize, usize),
    pub(super) eps: f32,
    pub(super) scale: f32,
    /// Granite's multiplier of each block's output before its residual add (None: 1).
    pub(super) residual: Option<f32>,
    /// `[B*T]` i32, on the model's device.
    pub(super) positions: Tensor,
    /// `[D/2]` f32, on the model's device.
    pub(super) inv_freq: Tensor,
    /// The windowed layers' own inverse frequencies (Gemma 3), on the model's device.
    pub(super) local_inv_freq: Option<Tensor>,
    /// The windowed layers' mask; the others drop its window.
    pub(super) mask: AttentionMask,
    pub(super) act: ops::GluAct,
}

impl LayerCtx {
    /// A block's output as its residual add takes it: Gemma 3's norm of it, Granite's
    /// multiplier.
    fn block_out(&self, y: Tensor, norm: Option<&Tensor>) -> Result<Tensor> {
        let y = match norm {
            Some(w) => ops::rmsnorm(&y, w, self.eps)?,
            None => y,
        };
        match self.residual {
            Some(r) => ops::scale(&y, r),
            None => Ok(y),
        }
    }
}

impl Layer {
    /// One decoder layer: attention and MLP blocks, each pre-normed with a residual. `seeds`
    /// are the dropout seeds of its seven linears; `cache` is its KV-cache slot (inference).
    ///
    /// Each residual add is left to the norm after it (`ops::add_rmsnorm`: one kernel on CUDA):
    /// `pending` is the previous layer's MLP output, not yet added to x, and the layer returns
    /// its residual stream after attention and its own MLP output, likewise apart.
    pub(super) fn forward(&self, x: &Tensor, pending: Option<&Tensor>, ctx: &LayerCtx, seeds: [Option<u64>; 7], cache: Option<&mut Option<(Tensor, Tensor)>>) -> Result<(Tensor, Tensor)> {
        let (b, t) = (ctx.b, ctx.t);
        let (h, g, d) = ctx.heads;
        // The projections' backwards make the normed input again from x (which RMSNorm's
        // backward keeps) instead of keeping it; likewise the MLP's, and down_proj makes
        // SwiGLU's product again from the gate and up outputs (which SwiGLU's keeps).
        let (x, hn) = match pending {
            Some(p) => ops::add_rmsnorm(x, p, &self.input_norm, ctx.eps)?,
            None => (x.clone(), ops::rmsnorm(x, &self.input_norm, ctx.eps)?),
        };
        let qkv = Linear::forward_group_remade(&[(&self.q, seeds[0]), (&self.k, seeds[1]), (&self.v, seeds[2])], &hn, Some(remade_rmsnorm(&x, &self.input_norm, ctx.eps)))?;
        let (q, k) = (ops::reshape(&qkv[0], [b * t, h, d])?, ops::reshape(&qkv[1], [b * t, g, d])?);
        let inv_freq = match (&ctx.local_inv_freq, self.windowed) {
            (Some(local), true) => local,
            _ => &ctx.inv_freq,
        };
        let rope = |x: &Tensor, norm: Option<&Tensor>| match (norm, self.rope) {
            // Qwen3: RMSNorm over each head of each token, then RoPE (one kernel on CUDA).
            (Some(w), true) => ops::rmsnorm_rope(x, w, ctx.eps, &ctx.positions, inv_freq),
            (None, true) => ops::rope(x, &ctx.positions, inv_freq),
            (Some(w), false) => ops::rmsnorm(x, w, ctx.eps),
            (None, false) => Ok(x.clone()),
        };
        let q = rope(&q, self.qk_norm.as_ref().map(|n| &n.q))?;
        let k = rope(&k, self.qk_norm.as_ref().map(|n| &n.k))?;
        let (mut k, mut v) = (ops::reshape(&k, [b, t, g, d])?, ops::reshape(&qkv[2], [b, t, g, d])?);
        if let Some(slot) = cache {
            (k, v) = super::kv_cache::extend(slot, k, v)?;
        }
        let mask = if self.windowed { ctx.mask.clone() } else { AttentionMask { window: None, ..ctx.mask.clone() } };
        let o = ops::attention(&ops::reshape(&q, [b, t, h, d])?, &k, &v, mask, ctx.scale)?;
        let o = ctx.block_out(self.o.forward(&ops::reshape(&o, [b * t, h * d])?, seeds[3])?, self.out_norms.as_ref().map(|n| &n.attn))?;
        let (x, hn) = ops::add_rmsnorm(&x, &o, &self.post_norm, ctx.eps)?;
        let gate_up = Linear::forward_group_remade(&[(&self.gate, seeds[4]), (&self.up, seeds[5])], &hn, Some(remade_rmsnorm(&x, &self.post_norm, ctx.eps)))?;
        let act = ops::glu(&gate_up[0], &gate_up[1], ctx.act)?;
        let (g, u, f) = (ops::saved(&gate_up[0]), ops::saved(&gate_up[1]), ctx.act);
        let remake: ops::Remake = std::sync::Arc::new(move || ops::glu(&g, &u, f));
        Ok((x, ctx.block_out(self.down.forward_remade(&act, seeds[6], Some(remake))?, self.out_norms.as_ref().map(|n| &n.mlp))?))
    }

    /// [`Layer::forward`] under `ops::checkpoint`, its residual adds done inside: the layer input
    /// and every tracked tensor of the layer are the checkpoint's inputs, substituted into a copy
    /// of the layer when it runs.
    pub(super) fn forward_checkpointed(&self, x: &Tensor, ctx: &LayerCtx, seeds: [Option<u64>; 7]) -> Result<Tensor> {
        let mut layer = self.clone();
        let tracked: Vec<usize> = layer.tensors_mut().into_iter().enumerate().filter(|(_, t)| t.is_tracked()).map(|(i, _)| i).collect();
        let mut inputs = vec![x.clone()];
        let all = layer.tensors_mut();
        inputs.extend(tracked.iter().map(|&i| all[i].clone()));
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let ctx = ctx.clone();
        ops::checkpoint(&refs, move |ins| {
            let mut l = layer.clone();
            let mut slots = l.tensors_mut();
            for (&i, t) in tracked.iter().zip(&ins[1..]) {
                *slots[i] = t.clone();
            }
            let (x, mlp) = l.forward(&ins[0], None, &ctx, seeds, None)?;
            ops::add(&x, &mlp)
        })
    }

    /// Every tensor of the layer, in a fixed order: norms (q/k norms, then output norms, last), then per linear its
    /// weight, bias, LoRA A and B, sparse delta values.
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out = vec![&mut self.input_norm, &mut self.post_norm];
        if let Some(n) = &mut self.qk_norm {
            out.extend([&mut n.q, &mut n.k]);
        }
        if let Some(n) = &mut self.out_norms {
            out.extend([&mut n.attn, &mut n.mlp]);
        }
        for lin in [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down] {
            out.push(&mut lin.weight);
            if let Some(bias) = &mut lin.bias {
                out.push(bias);
            }
            if let Some(l) = &mut lin.lora {
                out.push(&mut l.a);
                out.push(&mut l.b);
            }
            if let Some(sp) = &mut lin.sparse {
                out.push(&mut sp.values);
            }
        }
        out
    }
}

