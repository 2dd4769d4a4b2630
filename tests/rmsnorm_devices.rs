//! RMSNorm forward and backward on every device present, against the f64 CPU reference.
//! One test body; the device list comes from `Device::available()` (CI requires lavapipe).

mod common;

use proptest::prelude::*;
use tuna::kernels::rmsnorm::{reference, RmsNormParams};
use tuna::testing::{compare, Rng, Tolerance};
use tuna::{ops, DType, Device, Tensor};

fn check(dev: Device, dtype: DType, rows: usize, cols: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let p = RmsNormParams { rows, cols, eps: 1e-5 };
    let x = rng.vec(rows * cols, -2.0, 2.0);
    let w = rng.vec(cols, 0.5, 1.5);
    let dy = rng.vec(rows * cols, -1.0, 1.0);
    let put = |v: &[f32], shape: Vec<usize>| Tensor::from_vec(v.to_vec(), shape).unwrap().to_dtype(dtype).unwrap().to_device(&dev).unwrap();
    // The reference sees exactly the values the device sees (bf16-rounded when dtype is bf16).
    let as_f64 = |t: &Tensor| t.to_vec_f32().unwrap().into_iter().map(f64::from).collect::<Vec<_>>();
    let (xt, wt, gt) = (put(&x, vec![rows, cols]), put(&w, vec![cols]), put(&dy, vec![rows, cols]));
    let (xr, wr, gr) = (as_f64(&xt), as_f64(&wt), as_f64(&gt));
    let (y_want, rstd_want) = reference::forward(&xr, &wr, p);
    let (dx_want, dw_want) = reference::backward(&xr, &wr, &gr, p);
    let tol = if dtype == DType::BF16 { Tolerance::BF16 } else { Tolerance::F32 };
    let e = |e: tuna::Error| e.to_string();
    let out = ops::rmsnorm_forward(&xt, &wt, p.eps).map_err(e)?;
    compare(&format!("y on {dev}"), &out.y.to_vec_f32().map_err(e)?, &y_want, tol)?;
    compare(&format!("rstd on {dev}"), &out.rstd.to_vec_f32().map_err(e)?, &rstd_want, Tolerance::F32)?;
    let (dx, dw) = ops::rmsnorm_backward(&xt, &wt, &gt, &out.rstd).map_err(e)?;
    compare(&format!("dx on {dev}"), &dx.to_vec_f32().map_err(e)?, &dx_want, tol)?;
    // dw sums over all rows: scale the tolerance's absolute part by the row count.
    let dw_tol = tuna::testing::Tolerance { atol: tol.atol * rows as f64, rtol: tol.rtol };
    compare(&format!("dw on {dev}"), &dw.to_vec_f32().map_err(e)?, &dw_want, dw_tol)?;
    Ok(())
}

fn dtypes(dev: Device) -> Vec<DType> {
    match dev {
        Device::Cuda(_) => vec![DType::F32, DType::BF16],
        _ => vec![DType::F32],
    }
}

#[test]
fn rmsnorm_matches_reference_on_every_device() {
    // Shapes around the 256-wide workgroup: shorter, longer, not a multiple, one row, many rows.
    let shapes = [(1, 1), (3, 7), (5, 256), (4, 257), (2, 1000), (130, 64), (1, 4096)];
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, &(rows, cols)) in shapes.iter().enumerate() {
                check(dev, dtype, rows, cols, i as u64).unwrap_or_else(|e| panic!("{dtype} [{rows}, {cols}]: {e}"));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn rmsnorm_random_shapes_on_every_device(rows in 1usize..40, cols in 1usize..600, seed: u64) {
        for dev in common::devices() {
            for dtype in dtypes(dev) {
                check(dev, dtype, rows, cols, seed).map_err(TestCaseError::fail)?;
            }
        }
    }
}

#[test]
fn rmsnorm_has_no_kernel_for_bf16_on_wgpu_yet_and_says_so() {
    let Some(dev) = common::devices().into_iter().find(|d| matches!(d, Device::Wgpu(_))) else { return };
    let x = Tensor::zeros([2, 4], DType::BF16, &dev).unwrap();
    let w = Tensor::zeros([4], DType::BF16, &dev).unwrap();
    let e = ops::rmsnorm_forward(&x, &w, 1e-5).err().expect("bf16 on wgpu is not supported").to_string();
    assert!(e.contains("bf16"), "{e}");
}
