//! Training data: tokenized examples, truncation, a held-out split, seeded shuffling and padded
//! batches. The order of an epoch is a pure function of (seed, epoch), so a resumed run sees
//! exactly the batches an uninterrupted one would.

use crate::io::dataset::{tokenize, Dataset};
use crate::io::tokenizer::Tokenizer;
use crate::nn::Packing;
use crate::rng::Rng;
use crate::{Result, Tensor};

/// One tokenized example (or several packed into one row): ids and, per token, whether it is
/// a target.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
    /// For a packed row, per token the position where its example starts; empty otherwise.
    pub starts: Vec<u32>,
}

impl Sequence {
    /// Next-token targets this sequence contributes (a target at position t is predicted from t-1).
    pub fn targets(&self) -> usize {
        (1..self.mask.len()).filter(|&i| self.mask[i] && self.starts.get(i).is_none_or(|&s| s as usize != i)).count()
    }
}

/// A padded batch: ids `[B, T]` and the loss mask (padding is never a target).
pub struct Batch {
    pub ids: Tensor,
    pub mask: Vec<bool>,
    pub targets: usize,
    pub tokens: usize,
    /// Example boundaries when the batch holds packed rows.
    pub packing: Option<Packing>,
}

/// Packs sequences, in order, into rows of at most `max_len` tokens (first fit in order, a
/// sequence never split). Each example's first token is never a target of the one before.
pub fn pack(seqs: &[Sequence], max_len: usize) -> Vec<Sequence> {
    let mut rows: Vec<Sequence> = Vec::new();
    let mut cur = Sequence::default();
    for s in seqs {
        if !cur.ids.is_empty() && cur.ids.len() + s.ids.len() > max_len {
            rows.push(std::mem::take(&mut cur));
        }
        let start = cur.ids.len() as u32;
        cur.ids.extend_from_slice(&s.ids);
        cur.mask.extend_from_slice(&s.mask);
        cur.starts.extend(std::iter::repeat_n(start, s.ids.len()));
    }
    if !cur.ids.is_empty() {
        rows.push(cur);
    }
    rows
}

/// Tokenizes a dataset, truncating each example to `max_len` and dropping those left without
/// a target. Returns the sequences with their source line numbers.
pub fn tokenize_dataset(data: &Dataset, tok: &Tokenizer, max_len: usize, train_on_prompt: bool) -> Result<Vec<(usize, Sequence)>> {
    let mut out = Vec::new();
    for (line, ex) in &data.examples {
        let (mut ids, mut mask) = tokenize(tok, ex, train_on_prompt)
            .map_err(|e| crate::Error::file(&data.path, format!("line {line}: {e}")))?;
        ids.truncate(max_len);
        mask.truncate(max_len);
        let s = Sequence { ids, mask, starts: Vec::new() };
        if s.targets() > 0 {
            out.push((*line, s));
        }
    }
    Ok(out)
}

/// Splits off `eval_fraction` of the examples (at least one when the fraction is positive and
/// there are two or more), chosen by a seeded shuffle. Returns (train, eval).
pub fn split(mut seqs: Vec<Sequence>, eval_fraction: f32, seed: u64) -> (Vec<Sequence>, Vec<Sequence>) {
    shuffle(&mut seqs, seed ^ 0x5_0117);
    let n_eval = if eval_fraction > 0.0 && seqs.len() >= 2 {
        ((seqs.len() as f32 * eval_fraction).round() as usize).clamp(1, seqs.len() - 1)
    } else {
        0
    };
    let eval = seqs.split_off(seqs.len() - n_eval);
    (seqs, eval)
}

/// Fisher-Yates with the crate's seeded generator.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = Rng::new(seed);
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

/// The order of the training examples in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle_data: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle_data {
        shuffle(&mut order, seed.wrapping_add((epoch as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    }
    order
}

/// Pads `seqs` to the longest with token `pad` (masked out).
pub fn make_batch(seqs: &[&Sequence], pad: u32) -> Result<Batch> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    let packed = seqs.iter().any(|s| !s.starts.is_empty());
    let mut starts = Vec::with_capacity(if packed { seqs.len() * t } else { 0 });
    for s in seqs {
        ids.extend(s.ids.iter().map(|&i| i as i32));
        ids.extend(std::iter::repeat_n(pad as i32, t - s.ids.len()));
        mask.extend_from_slice(&s.mask);
        mask.extend(std::iter::repeat_n(false, t - s.ids.len()));
        if packed {
            if s.starts.is_empty() {
                starts.extend(std::iter::repeat_n(0, s.ids.len()));
            } else {
                starts.extend_from_slice(&s.starts);
            }
            // Each padding token is an example of its own.
            starts.extend((s.ids.len()..t).map(|p| p as u32));
        }
    }
    Ok(Batch {
        packing: packed.then(|| Packing { starts: std::sync::Arc::new(starts) }),
        ids: Tensor::from_vec_i32(ids, [seqs.len(), t])?,
        mask,
        targets: seqs.iter().map(|s| s.targets()).sum(),
        tokens: seqs.iter().map(|s| s.ids.len()).sum(),
    })
}
