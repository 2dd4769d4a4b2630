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

    /// Whether `sample` takes the argmax: temperature 0, or one so small that 1/t overflows.
    /// (Then `ops::argmax_last` picks the same token where the logits are.)
    pub fn is_greedy(&self) -> bool {
        !(1.0 / self.opts.temperature).is_finite()
    }

    /// The next token for a row of logits. Sampling weighs each candidate by
    /// `exp((logit - max) / temperature)` (f32, in the CPU's widest vectors) and draws by the
    /// running sum of the weights in f64. Nothing is sorted: the order of the draw does not
    /// change the distribution, so top-k takes its k best by selection, and top-p finds the
    /// nucleus (the most likely tokens, from the top down, until their weight reaches top_p of
    /// the whole) by halving: split the remaining tokens around their middle one, keep the half
    /// where the nucleus ends. A whole-vocabulary sort took ~2 ms a token at vocabulary 49,152
    /// (the 2-core AVX-512 machine), a seventh of a SmolLM-135M decoding step.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.opts.temperature;
        if self.is_greedy() || logits.len() <= 1 {
            return crate::kernels::cross_entropy::reference::argmax(logits) as u32;
        }
        let max = crate::kernels::math::max(logits);
        // The difference first, then the scale: exact near the maximum, whatever the temperature.
        let mut weight: Vec<f32> = logits.iter().map(|&l| (l - max) * inv_t).collect();
        crate::kernels::math::exp_shifted_sum(&mut weight, 0.0);
        let v = logits.len();
        let k = if self.opts.top_k == 0 { v } else { self.opts.top_k.min(v) };
        if k == v && self.opts.top_p >= 1.0 {
            return self.draw(&weight, 0..v as u32);
        }
        // Most likely first; ties keep the lower id first.
        let better = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let mut pool: Vec<u32> = (0..v as u32).collect();
        if k < v {
            pool.select_nth_unstable_by(k - 1, better);
            pool.truncate(k);
        }
        if self.opts.top_p < 1.0 {
            let mass = |ids: &[u32]| ids.iter().map(|&i| weight[i as usize] as f64).sum::<f64>();
            let want = self.opts.top_p as f64 * mass(&pool);
            // pool[..lo] holds the best tokens, weighing `acc` < want; the nucleus ends in
            // pool[lo..hi].
            let (mut lo, mut hi, mut acc) = (0, pool.len(), 0.0);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                pool[lo..hi].select_nth_unstable_by(mid - lo - 1, better);
                let left = mass(&pool[lo..mid]);
                if acc + left >= want {
                    hi = mid;
                } else {
                    acc += left;
                    lo = mid;
                }
            }
            pool.truncate(hi);
        }
        self.draw(&weight, pool)
    }

    /// Draws one of `candidates` with probability proportional to its weight: the first whose
    /// running sum (f64, in the given order) passes u times their total.
    fn draw(&mut self, weight: &[f32], candidates: impl IntoIterator<Item = u32> + Clone) -> u32 {
        let total: f64 = candidates.clone().into_iter().map(|i| weight[i as usize] as f64).sum();
        let target = self.rng.next_f64() * total;
        let (mut acc, mut last) = (0.0, None);
        for i in candidates {
            let w = weight[i as usize] as f64;
            acc += w;
            if target < acc {
                return i;
            }
            if w > 0.0 || last.is_none() {
                last = Some(i);
            }
        }
        // u·total rounded up to the total: the last candidate that has any weight.
        last.unwrap_or(0)
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
            let logits = self.forward_last(&ids, Some(&mut cache))?;
            // Greedy: the pick is made where the logits are; a GPU hands back one index.
            let next = if sampler.is_greedy() { crate::ops::argmax_last(&logits)?.to_vec::<i32>()?[0] as u32 } else { sampler.sample(&logits.to_vec_f32()?) };
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
