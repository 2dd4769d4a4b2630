//! Greedy decoding's pick (`ops::argmax_last`) on one device against the CPU's rule
//! (`kernels::cross_entropy::reference::argmax`), index for index; shared by
//! `tests/ops_devices.rs` and `tools/gpu-check`.

use crate::kernels::cross_entropy::reference::argmax;
use crate::testing::Rng;
use crate::{ops, DType, Device, Tensor};

/// Ten rows of `vocab` logits in `dtype` (shaped `[2, 5, vocab]`), each a case of the rule:
/// small integers (ties for the largest, the first must win), continuous values, the largest
/// in the last column, NaN first (the pick is 0), NaNs among numbers (skipped), only NaNs, only
/// -inf, several +inf, and the largest once past the first 256 columns (a later stride of the
/// kernels' loops).
pub fn check_argmax(dev: Device, dtype: DType, vocab: usize, seed: u64) -> Result<String, String> {
    let mut rng = Rng::new(seed);
    let v = vocab;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    rows.push((0..v).map(|_| (rng.next_u64() % 8) as f32).collect());
    rows.push((0..v).map(|_| rng.uniform(-3.0, 3.0)).collect());
    let mut last = vec![-1.0f32; v];
    last[v - 1] = 2.0;
    rows.push(last);
    let mut nan_first: Vec<f32> = (0..v).map(|i| i as f32).collect();
    nan_first[0] = f32::NAN;
    rows.push(nan_first);
    rows.push((0..v).map(|i| if i % 3 == 1 { f32::NAN } else { (rng.next_u64() % 5) as f32 }).collect());
    rows.push(vec![f32::NAN; v]);
    rows.push(vec![f32::NEG_INFINITY; v]);
    rows.push((0..v).map(|i| if i % 4 == 2 { f32::INFINITY } else { 1.0 }).collect());
    let mut far = vec![0.5f32; v];
    far[v * 3 / 4] = 4.0;
    rows.push(far);
    rows.push((0..v).map(|_| -((rng.next_u64() % 3) as f32)).collect());
    let host = Tensor::from_vec(rows.concat(), [2, 5, v]).and_then(|t| t.to_dtype(dtype)).map_err(|e| format!("making the logits: {e}"))?;
    let held = host.to_vec_f32().map_err(|e| e.to_string())?;
    let want: Vec<i32> = held.chunks(v).map(|r| argmax(r) as i32).collect();
    let got = host
        .to_device(&dev)
        .and_then(|t| ops::argmax_last(&t))
        .and_then(|t| {
            if t.dims() != [2, 5] || t.dtype() != DType::I32 {
                return Err(crate::Error::InvalidArgument(format!("argmax_last gave {t:?}, not [2, 5] i32")));
            }
            t.to_vec::<i32>()
        })
        .map_err(|e| format!("{dev} {dtype} V {v}: {e}"))?;
    if got != want {
        return Err(format!("{dev} {dtype} V {v}: picks {got:?}, the CPU's rule gives {want:?}"));
    }
    Ok(format!("10 rows, picks {want:?}"))
}
