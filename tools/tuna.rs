//! `tuna`: the reference command line.
//!
//! Subcommands so far:
//! - `tuna devices` lists what this machine has;
//! - `tuna check [--device D]` runs RMSNorm forward and backward on every device (or one)
//!   against the f64 CPU reference and prints the largest errors: the quickest proof that a
//!   machine's kernels build, load and compute.

use std::process::ExitCode;

use tuna::kernels::rmsnorm::{reference, RmsNormParams};
use tuna::testing::Rng;
use tuna::{ops, Device, Tensor};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("devices") => devices(),
        Some("check") => check(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: tuna <command>

commands:
  devices                 list the CPU, CUDA devices and wgpu adapters this machine has
  check [--device D]      run the RMSNorm kernels on every device (or D: cpu, cuda[:N], wgpu[:N])
                          against the f64 CPU reference";

fn devices() -> Result<(), String> {
    for d in Device::available() {
        println!("{:<8} {}", d.device.to_string(), d.name);
    }
    if let Err(e) = tuna::device::cuda::device_count() {
        println!("(cuda: {e})");
    }
    Ok(())
}

fn check(args: &[String]) -> Result<(), String> {
    let devices: Vec<Device> = match args {
        [] => Device::available().into_iter().map(|d| d.device).collect(),
        [flag, d] if flag == "--device" => vec![d.parse().map_err(|e: tuna::Error| e.to_string())?],
        _ => return Err(format!("check: unexpected arguments {args:?}\n\n{USAGE}")),
    };
    let (rows, cols) = (512, 1000);
    let p = RmsNormParams { rows, cols, eps: 1e-5 };
    let mut rng = Rng::new(1);
    let x = rng.vec(rows * cols, -2.0, 2.0);
    let w = rng.vec(cols, 0.5, 1.5);
    let dy = rng.vec(rows * cols, -1.0, 1.0);
    let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let (y_ref, _) = reference::forward(&f64v(&x), &f64v(&w), p);
    let (dx_ref, dw_ref) = reference::backward(&f64v(&x), &f64v(&w), &f64v(&dy), p);
    let max_err = |got: &[f32], want: &[f64]| got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    println!("RMSNorm [{rows}, {cols}] f32 against the f64 reference (max abs error):");
    let mut failed = false;
    for dev in devices {
        let run = || -> tuna::Result<(f64, f64, f64)> {
            let put = |v: &[f32], s: Vec<usize>| Tensor::from_slice(v, s, &dev);
            let (xt, wt, gt) = (put(&x, vec![rows, cols])?, put(&w, vec![cols])?, put(&dy, vec![rows, cols])?);
            let out = ops::rmsnorm_forward(&xt, &wt, p.eps)?;
            let (dx, dw) = ops::rmsnorm_backward(&xt, &wt, &gt, &out.rstd)?;
            Ok((
                max_err(&out.y.to_vec_f32()?, &y_ref),
                max_err(&dx.to_vec_f32()?, &dx_ref),
                max_err(&dw.to_vec_f32()?, &dw_ref),
            ))
        };
        match run() {
            Ok((y, dx, dw)) => {
                let ok = y < 1e-4 && dx < 1e-4 && dw < 1e-2;
                failed |= !ok;
                println!("  {:<8} y {y:.1e}  dx {dx:.1e}  dw {dw:.1e}  {}", dev.to_string(), if ok { "ok" } else { "FAIL" });
            }
            Err(e) => {
                failed = true;
                println!("  {:<8} error: {e}", dev.to_string());
            }
        }
    }
    if failed {
        Err("some devices did not match the reference".into())
    } else {
        Ok(())
    }
}
