//! Token generation with a KV cache: greedy, or sampling with temperature, top-k and top-p
//! from a seeded generator; stops at an end-of-sequence token or after `max_new_tokens`.

use crate::nn::{KvCache, Llama};
use crate::rng::Rng;
use crate::{Error, Result, Tensor};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax; the first maximum on ties, as torch.argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
    /// Generation stops after producing any of these.
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 64, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, eos_token_ids: Vec::new() }
    }
}

/// Picks the next token from a row of logits.
pub struct Sampler {
    opts: GenerateOptions,
    rng: Rng,
}

impl Sampler {
    pub fn new(opts: GenerateOptions) -> Result<Self> {
        let temperature_ok = opts.temperature.is_finite() && opts.temperature >= 0.0;
        let top_p_ok = opts.top_p > 0.0 && opts.top_p <= 1.0;
        if !temperature_ok || !top_p_ok {
            return Err(Error::InvalidArgument(format!(
                "generation: temperature must be >= 0 (got {}) and top_p in (0, 1] (got {})",
                opts.temperature, opts.top_p
            )));
        }
        let rng = Rng::new(opts.seed);
        Ok(Sampler { opts, rng })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.opts.temperature == 0.0 {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            return best as u32;
        }
        // Candidates sorted by logit, most likely first (stable: ties keep the lower id first).
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.opts.top_k > 0 {
            idx.truncate(self.opts.top_k);
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx.iter().map(|&i| (((logits[i] - max) / self.opts.temperature) as f64).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.opts.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= self.opts.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |k| k + 1);
            probs.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return idx[n] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

impl Llama {
    /// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new token
    /// as soon as it is chosen (for streaming). Returns the new tokens (the EOS included when
    /// one ended the generation).
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("generation needs at least one prompt token".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!("prompt token {bad} is outside the vocabulary (size {vocab})")));
        }
        let mut sampler = Sampler::new(opts.clone())?;
        let mut cache = KvCache::new(self.config.num_layers);
        let mut input: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
        let mut out = Vec::new();
        for _ in 0..opts.max_new_tokens {
            let ids = Tensor::from_vec_i32(input.clone(), [1, input.len()])?.to_device(&self.device())?;
            let logits = self.forward(&ids, Some(&mut cache))?;
            let all = logits.to_vec_f32()?;
            let next = sampler.sample(&all[(input.len() - 1) * vocab..]);
            out.push(next);
            on_token(next);
            if opts.eos_token_ids.contains(&next) {
                break;
            }
            input = vec![next as i32];
        }
        Ok(out)
    }
}
