//! Token generation with a KV cache: greedy, or sampling with temperature, top-k and top-p
//! from a seeded generator; stops at an end-of-sequence token or after `max_new_tokens`.

use crate::nn::{KvCache, Llama};
use crate::rng::Rng;
use crate::tensor::PendingValues;
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
    /// transformers' `repetition_penalty` (1: off): before the pick, the logit of every token
    /// already in the prompt or the output is divided by it where positive and multiplied by it
    /// where negative.
    pub repetition_penalty: f32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 64, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, eos_token_ids: Vec::new(), repetition_penalty: 1.0 }
    }
}

/// Applies `penalty` (see [`GenerateOptions::repetition_penalty`]) to the logits of the tokens
/// marked in `seen`.
pub fn penalize_repeats(logits: &mut [f32], seen: &[bool], penalty: f32) {
    for (l, _) in logits.iter_mut().zip(seen).filter(|(_, &s)| s) {
        *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
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
        if !(opts.repetition_penalty.is_finite() && opts.repetition_penalty > 0.0) {
            return Err(Error::InvalidArgument(format!("generation: repetition_penalty must be > 0 (got {})", opts.repetition_penalty)));
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
    /// change the distribution. Top-k drops every token below a floor that at least k tokens
    /// reach, then takes its k best by selection; top-p drops every token too light to be in
    /// the nucleus (the most likely tokens, from the top down, until their weight reaches top_p
    /// of the whole), then finds the nucleus by halving: split the remaining tokens around their
    /// middle one, keep the half where the nucleus ends. At vocabulary 128,256 (a 2-core
    /// AVX-512 machine, `cargo bench --bench kernels -- sampling/cpu`) top-p 0.9 takes 0.26 ms
    /// a token (1.1 ms before its floor), top-k 50 0.25 ms (0.49 before), and sorting the
    /// vocabulary 5.8 to 7.4 ms.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.opts.temperature;
        if self.is_greedy() || logits.len() <= 1 {
            return crate::kernels::math::argmax(logits) as u32;
        }
        let max = crate::kernels::math::max(logits);
        // The difference first, then the scale: exact near the maximum, whatever the temperature.
        let mut weight: Vec<f32> = logits.iter().map(|&l| (l - max) * inv_t).collect();
        crate::kernels::math::exp_shifted_sum(&mut weight, 0.0);
        let weight = &weight[..];
        match candidates(logits, weight, self.opts.top_k, self.opts.top_p) {
            None => self.draw(weight) as u32,
            Some(pool) => {
                let w: Vec<f32> = pool.iter().map(|&i| weight[i as usize]).collect();
                pool[self.draw(&w)]
            }
        }
    }

    /// Draws an index of `weight` with probability proportional to its weight: the first whose
    /// running sum (f64, in order) passes u times the total. The sums run by blocks of 64, each
    /// in eight lanes, so that the adds do not wait on each other; the walk then steps over
    /// whole blocks to the one where the sum passes. (One chain of dependent f64 adds over
    /// 128,256 weights took ~0.17 ms.)
    fn draw(&mut self, weight: &[f32]) -> usize {
        const BLOCK: usize = 64;
        let blocks: Vec<f64> = weight.chunks(BLOCK).map(lanes_sum).collect();
        let target = self.rng.next_f64() * blocks.iter().sum::<f64>();
        let mut acc = 0.0;
        for (b, (&mass, ws)) in blocks.iter().zip(weight.chunks(BLOCK)).enumerate() {
            if target < acc + mass {
                let mut run = acc;
                for (j, &w) in ws.iter().enumerate() {
                    run += w as f64;
                    if target < run {
                        return b * BLOCK + j;
                    }
                }
                // The block's running sum fell short of its lane sum by a rounding: on.
            }
            acc += mass;
        }
        // u·total rounded up to the total: the last index that has any weight (0 when none has).
        weight.iter().rposition(|&w| w > 0.0).unwrap_or(0)
    }
}

/// The tokens `sample` draws from (None: every token) under top-k (`top_k`, 0 for all) and
/// top-p, given the logits and their weights `exp((logit - max) / temperature)`: the k most
/// likely, then the shortest head of those, most likely first, that weighs `top_p` of them
/// (ties: the lower id first). In no particular order.
fn candidates(logits: &[f32], weight: &[f32], top_k: usize, top_p: f32) -> Option<Vec<u32>> {
    let v = logits.len();
    let k = if top_k == 0 { v } else { top_k.min(v) };
    if k == v && top_p >= 1.0 {
        return None;
    }
    // Most likely first; ties keep the lower id first.
    let better = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut pool: Vec<u32> = if k < v { k_best(logits, k, better) } else { Vec::new() };
    if top_p < 1.0 {
        let mass = |ids: &[u32]| ids.iter().map(|&i| weight[i as usize] as f64).sum::<f64>();
        let total = if k < v { mass(&pool) } else { lanes_sum(weight) };
        let want = top_p as f64 * total;
        // The nucleus ends before any token that, with the tokens after it, weighs at most
        // `total - want`. Those are at most `k` tokens, none heavier than it, so a token
        // lighter than `(total - want) / k` is out (the margin of a millionth is far above
        // the sums' f64 rounding). Every token of the nucleus stays, and it is still the
        // best tokens' shortest head that weighs `want`.
        let floor = (total - want) / k as f64 * (1.0 - 1e-6);
        if k < v {
            pool.retain(|&i| weight[i as usize] as f64 >= floor);
        } else {
            pool = (0..v as u32).filter(|&i| weight[i as usize] as f64 >= floor).collect();
        }
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
    Some(pool)
}

/// Σ of weights in f64, in eight running sums added at the end.
fn lanes_sum(ws: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = ws.chunks_exact(8);
    for c in &mut chunks {
        for (l, &w) in lanes.iter_mut().zip(c) {
            *l += w as f64;
        }
    }
    chunks.remainder().iter().map(|&w| w as f64).sum::<f64>() + lanes.iter().sum::<f64>()
}

/// The k best tokens (`better` first; 0 < k < `logits.len()`), in no order. The first k
/// chunks of `len / k` logits each hold a largest value, so k tokens reach the smallest of those
/// maxima: every token below it is dropped in one pass, and the selection sorts out the few
/// that remain (NaNs, which `total_cmp` ranks above every number, are kept).
fn k_best(logits: &[f32], k: usize, better: impl FnMut(&u32, &u32) -> std::cmp::Ordering) -> Vec<u32> {
    let maxima = logits.chunks_exact(logits.len() / k).take(k).map(crate::kernels::math::max);
    let floor = maxima.fold(f32::INFINITY, |f, m| if m.is_nan() || f.is_nan() { f32::NAN } else { f.min(m) });
    let floor = if floor.is_nan() { f32::NEG_INFINITY } else { floor };
    let mut pool: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize] >= floor || logits[i as usize].is_nan()).collect();
    if pool.len() > k {
        pool.select_nth_unstable_by(k - 1, better);
        pool.truncate(k);
    }
    pool
}

impl Llama {
    /// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new token
    /// as soon as it is chosen (for streaming). Returns the new tokens (the EOS included when
    /// one ended the generation).
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
        self.generate_until(prompt, opts, |t| {
            on_token(t);
            true
        })
    }

    /// [`Llama::generate`], with `on_token` saying whether to go on: false ends the generation
    /// after that token, as an EOS does (for stop strings, which need the decoded text).
    pub fn generate_until(&self, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32) -> bool) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("generation needs at least one prompt token".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!("prompt token {bad} is outside the vocabulary (size {vocab})")));
        }
        let mut sampler = Sampler::new(opts.clone())?;
        let mut cache = KvCache::new(self.config.num_layers);
        let mut out = Vec::new();
        // Hands a chosen token over; true when it ends the generation.
        let mut take = |next: u32, out: &mut Vec<u32>| {
            out.push(next);
            !on_token(next) || opts.eos_token_ids.contains(&next)
        };
        let mut input = Tensor::from_vec_i32(prompt.iter().map(|&t| t as i32).collect(), [1, prompt.len()])?.to_device(&self.device())?;
        // Sampling, and a repetition penalty (which needs the logits and the tokens so far),
        // pick on the host.
        let penalty = opts.repetition_penalty != 1.0;
        if !sampler.is_greedy() || penalty {
            let mut seen = vec![false; if penalty { vocab } else { 0 }];
            for &t in prompt.iter().filter(|_| penalty) {
                seen[t as usize] = true;
            }
            for _ in 0..opts.max_new_tokens {
                let mut logits = self.forward_last(&input, Some(&mut cache))?.to_vec_f32()?;
                if penalty {
                    penalize_repeats(&mut logits, &seen, opts.repetition_penalty);
                }
                let next = sampler.sample(&logits);
                if let Some(s) = seen.get_mut(next as usize) {
                    *s = true;
                }
                if take(next, &mut out) {
                    break;
                }
                input = Tensor::from_vec_i32(vec![next as i32], [1, 1])?.to_device(&self.device())?;
            }
            return Ok(out);
        }
        // Greedy: the pick is made where the logits are and feeds the next step there, and on
        // a GPU the host reads it one step behind: step t + 1 is queued before token t is
        // known, so the device does not wait on the host between tokens. When token t ends
        // the generation, step t + 1's work is dropped. (A CPU has the pick at once, so it
        // reads it at once and runs no step too many.)
        let lag = !matches!(self.device(), crate::Device::Cpu);
        let mut behind: Option<PendingValues> = None;
        for _ in 0..opts.max_new_tokens {
            let logits = self.forward_last(&input, Some(&mut cache))?;
            input = crate::ops::reshape(&crate::ops::argmax_last(&logits)?, [1, 1])?;
            let previous = behind.replace(input.read_later()?);
            let ready = if lag { previous } else { behind.take() };
            if let Some(read) = ready {
                if take(read.wait_i32()?[0] as u32, &mut out) {
                    return Ok(out);
                }
            }
        }
        if let Some(last) = behind {
            take(last.wait_i32()?[0] as u32, &mut out);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule of transformers' `RepetitionPenaltyLogitsProcessor`
    /// (`torch.where(score < 0, score * penalty, score / penalty)` on the tokens seen): both
    /// signs, above and below 1, and tokens not seen left alone. (The greedy fixture's picks
    /// only meet the positive branch.)
    #[test]
    fn repeats_are_penalized_on_both_signs() {
        let seen = [true, true, false, false, true];
        for penalty in [2.0f32, 0.5] {
            let mut logits = [3.0f32, -3.0, 3.0, -3.0, 0.0];
            penalize_repeats(&mut logits, &seen, penalty);
            assert_eq!(logits, [3.0 / penalty, -3.0 * penalty, 3.0, -3.0, 0.0], "penalty {penalty}");
        }
    }

    /// `candidates` against the rule as it reads (`testing::sampling::nucleus`, which sorts the
    /// whole vocabulary), on the same f32 weights: rows from flat (the floors drop nothing) to
    /// peaked (they drop nearly every token), with and without ties, over vocabularies from 2 to
    /// 5000.
    #[test]
    fn candidates_are_what_sorting_the_vocabulary_leaves() {
        let mut rng = Rng::new(11);
        for case in 0..120 {
            let v = [2, 7, 64, 1000, 5000][case % 5];
            let spread = [0.5, 4.0, 16.0][case / 5 % 3];
            let mut logits: Vec<f32> = (0..v).map(|_| rng.uniform(-1.0, 1.0) * spread).collect();
            if case / 15 % 2 == 1 {
                // Ties: logits on a grid of halves.
                logits.iter_mut().for_each(|l| *l = (*l * 2.0).round() / 2.0);
            }
            let temperature = [1.0, 0.7, 1.6][case / 30 % 3];
            let max = crate::kernels::math::max(&logits);
            let mut weight: Vec<f32> = logits.iter().map(|&l| (l - max) / temperature).collect();
            crate::kernels::math::exp_shifted_sum(&mut weight, 0.0);
            for (k, p) in [(0, 0.9), (0, 0.55), (0, 1e-6), (1, 1.0), (5, 1.0), (50, 1.0), (50, 0.8), (v - 1, 0.95), (v, 0.3)] {
                let mut got = candidates(&logits, &weight, k, p).unwrap_or_else(|| (0..v as u32).collect());
                got.sort_unstable();
                let mut want: Vec<u32> = crate::testing::sampling::nucleus(&logits, |i| weight[i] as f64, k, p as f64).into_iter().map(|(i, _)| i).collect();
                want.sort_unstable();
                assert_eq!(got, want, "case {case}: V {v}, spread {spread}, t {temperature}, k {k}, p {p}");
            }
        }
    }
}
