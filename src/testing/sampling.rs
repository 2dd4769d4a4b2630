//! The sampling rule as it reads, for tests: sort every token, cut, sum.

/// The tokens top-k and top-p keep, most likely first (ties: the lower id first), each with
/// its weight: all tokens sorted by logit, the first `top_k` kept (0: all), then the shortest
/// head of those whose weight reaches `top_p` of theirs. `weight(i)` is token i's
/// unnormalised probability.
pub fn nucleus(logits: &[f32], weight: impl Fn(usize) -> f64, top_k: usize, top_p: f64) -> Vec<(u32, f64)> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if top_k > 0 {
        ids.truncate(top_k);
    }
    let w: Vec<f64> = ids.iter().map(|&i| weight(i as usize)).collect();
    let want = top_p * w.iter().sum::<f64>();
    let mut keep = ids.len();
    if top_p < 1.0 {
        let mut acc = 0.0;
        keep = w.iter().position(|x| {
            acc += x;
            acc >= want
        }).map_or(keep, |n| n + 1);
    }
    ids.into_iter().zip(w).take(keep).collect()
}
