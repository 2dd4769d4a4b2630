//! `gpu-check`: one prepared program for a machine with an NVIDIA GPU and no Rust toolchain.
//!
//! Built here (`cargo build --release --bin gpu-check`), carried to the GPU machine, run as
//! `gpu-check OUT_DIR` (or through `tools/gpu-check/run.sh`, which also runs the PyTorch
//! baselines). It:
//! 1. lists the devices and whether libcuda and libnvrtc load;
//! 2. runs every CUDA test case against the f64 CPU reference (the same check bodies the test
//!    suite runs on the CPU and wgpu), and compiles every module with NVRTC;
//! 3. times the kernel micro-benchmarks with CUDA events, beside a device-to-device copy of the
//!    same bytes as the bandwidth peer measured in the same run;
//! 4. prints a short table and writes `OUT_DIR/gpu-check.json`.
//!
//! Exit status: 0 when every case passed, 1 when one failed, 2 when no CUDA device was found.
//! Later kernels add their cases to `cases()` and `benches()`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use serde_json::{json, Value};
use tuna::device::cuda::{self, CudaRuntime};
use tuna::kernels::rmsnorm::{self, RmsNormParams};
use tuna::{DType, Device};

struct CaseResult {
    name: String,
    ok: bool,
    detail: String,
}

fn main() -> ExitCode {
    let Some(out_dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gpu-check OUT_DIR");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let devices: Vec<Value> = Device::available()
        .iter()
        .map(|d| json!({ "device": d.device.to_string(), "name": d.name }))
        .collect();
    println!("tuna gpu-check {}", env!("CARGO_PKG_VERSION"));
    for d in &devices {
        println!("  {:<8} {}", d["device"].as_str().unwrap_or(""), d["name"].as_str().unwrap_or(""));
    }
    let mut report = json!({
        "tuna_version": env!("CARGO_PKG_VERSION"),
        "devices": devices,
        "libcuda": cuda::driver_present(),
        "libnvrtc": cuda::nvrtc_present(),
        "embedded_ptx_archs": cuda::modules().first().map(|m| m.ptx.iter().map(|(a, _)| *a).collect::<Vec<_>>()).unwrap_or_default(),
    });
    match cuda::device_count() {
        Ok(n) if n > 0 => {}
        other => {
            let why = other.err().map(|e| e.to_string()).unwrap_or_else(|| "no CUDA device".into());
            eprintln!("gpu-check: {why}");
            report["error"] = json!(why);
            write_report(&out_dir, &report);
            return ExitCode::from(2);
        }
    }
    let rt = match cuda::runtime(0) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpu-check: {e}");
            report["error"] = json!(e.to_string());
            write_report(&out_dir, &report);
            return ExitCode::from(2);
        }
    };

    println!("\ntests (against the f64 CPU reference):");
    let results = cases();
    let mut failed = 0;
    for r in &results {
        failed += usize::from(!r.ok);
        println!("  {:<4} {:<44} {}", if r.ok { "ok" } else { "FAIL" }, r.name, r.detail);
    }
    report["tests"] = results.iter().map(|r| json!({"name": r.name, "ok": r.ok, "detail": r.detail})).collect();

    println!("\nbenchmarks (median of 20 after 3 warm-up runs, CUDA events):");
    println!("  {:<38} {:>10} {:>10} {:>12}", "kernel", "time µs", "GB/s", "of copy bw");
    let benches = match benches(&rt) {
        Ok(b) => b,
        Err(e) => {
            println!("  error: {e}");
            failed += 1;
            Vec::new()
        }
    };
    report["benchmarks"] = Value::Array(benches);
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    report["failed"] = json!(failed);
    write_report(&out_dir, &report);
    println!("\n{} of {} cases passed", results.len() - failed.min(results.len()), results.len());
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write_report(dir: &std::path::Path, report: &Value) {
    let path = dir.join("gpu-check.json");
    let tmp = dir.join("gpu-check.json.tmp");
    let res = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, serde_json::to_string_pretty(report).expect("json")))
        .and_then(|_| std::fs::rename(&tmp, &path));
    match res {
        Ok(()) => println!("report: {}", path.display()),
        Err(e) => eprintln!("gpu-check: writing {}: {e}", path.display()),
    }
}

/// Every CUDA test case. Each returns ok or the first mismatches.
fn cases() -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut push = |name: String, r: Result<(), String>| {
        out.push(match r {
            Ok(()) => CaseResult { name, ok: true, detail: String::new() },
            Err(e) => CaseResult { name, ok: false, detail: e },
        })
    };
    for m in cuda::modules() {
        for cc in [80, 90] {
            let r = if cuda::nvrtc_present() {
                cuda::compile_with_nvrtc(m, cc).map(|_| ()).map_err(|e| e.to_string())
            } else {
                Err("libnvrtc not found".into())
            };
            push(format!("nvrtc {} compute_{cc}", m.name), r);
        }
    }
    let shapes = [(1, 1), (3, 7), (5, 256), (4, 257), (2, 1000), (130, 64), (1, 4096), (64, 8192), (4096, 4096)];
    for dtype in [DType::F32, DType::BF16] {
        for (i, &(rows, cols)) in shapes.iter().enumerate() {
            push(
                format!("rmsnorm {dtype} [{rows}, {cols}]"),
                tuna::testing::check_rmsnorm(Device::Cuda(0), dtype, rows, cols, i as u64),
            );
        }
    }
    out
}

/// Median time in µs of `f` over 20 runs after 3 warm-ups, timed with events on `stream`.
fn time_us(rt: &CudaRuntime, mut f: impl FnMut() -> tuna::Result<()>) -> tuna::Result<f64> {
    let err = |e| tuna::Error::Cuda { context: "timing".into(), message: format!("{e:?}") };
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (rt.ctx.new_event(flags).map_err(err)?, rt.ctx.new_event(flags).map_err(err)?);
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::new();
    for _ in 0..20 {
        start.record(&rt.stream).map_err(err)?;
        f()?;
        end.record(&rt.stream).map_err(err)?;
        times.push(start.elapsed_ms(&end).map_err(err)? as f64 * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(s: &Arc<CudaStream>, n: usize) -> tuna::Result<CudaSlice<T>> {
    s.alloc_zeros::<T>(n).map_err(|e| tuna::Error::Cuda { context: "alloc".into(), message: format!("{e:?}") })
}

/// Kernel micro-benchmarks through the public launchers (cudarc slices, no tuna tensors).
fn benches(rt: &Arc<CudaRuntime>) -> tuna::Result<Vec<Value>> {
    let mut rows_out = Vec::new();
    let s = &rt.stream;
    for &(m, n) in &[(4096usize, 4096usize), (16384, 2048), (8192, 8192)] {
        let p = RmsNormParams { rows: m, cols: n, eps: 1e-5 };
        macro_rules! bench_dtype {
            ($t:ty, $name:expr) => {{
                let esize = std::mem::size_of::<$t>();
                let x = alloc::<$t>(s, m * n)?;
                let w = alloc::<$t>(s, n)?;
                let dy = alloc::<$t>(s, m * n)?;
                let mut y = alloc::<$t>(s, m * n)?;
                let mut dx = alloc::<$t>(s, m * n)?;
                let mut dw = alloc::<$t>(s, n)?;
                let mut rstd = alloc::<f32>(s, m)?;
                let mut copy_dst = alloc::<$t>(s, m * n)?;
                // The peer: a device-to-device copy of one [M, N] tensor (reads and writes M*N).
                let copy_us = time_us(rt, || {
                    s.memcpy_dtod(&x, &mut copy_dst).map_err(|e| tuna::Error::Cuda { context: "memcpy".into(), message: format!("{e:?}") })
                })?;
                let copy_gbs = (2 * m * n * esize) as f64 / copy_us / 1e3;
                let fwd_us = time_us(rt, || {
                    rmsnorm::cuda::forward::<$t>(s, &rt.modules, &x.slice(..), &w.slice(..), &mut y.slice_mut(..), &mut rstd.slice_mut(..), p)
                })?;
                let bwd_us = time_us(rt, || {
                    rmsnorm::cuda::backward::<$t>(s, &rt.modules, &x.slice(..), &w.slice(..), &dy.slice(..), &rstd.slice(..), &mut dx.slice_mut(..), &mut dw.slice_mut(..), p)
                })?;
                // Bytes that must move: fwd reads x and writes y (2·M·N); bwd's dx pass reads x
                // and dy and writes dx (3·M·N), its dw pass reads x and dy again (2·M·N).
                let fwd_bytes = (2 * m * n * esize) as f64;
                let bwd_bytes = (5 * m * n * esize) as f64;
                for (kernel, us, bytes) in [("rmsnorm_fwd", fwd_us, fwd_bytes), ("rmsnorm_bwd", bwd_us, bwd_bytes), ("memcpy_dtod (peer)", copy_us, (2 * m * n * esize) as f64)] {
                    let gbs = bytes / us / 1e3;
                    let name = format!("{kernel} {} [{m}, {n}]", $name);
                    println!("  {:<38} {:>10.1} {:>10.0} {:>11.0}%", name, us, gbs, 100.0 * gbs / copy_gbs);
                    rows_out.push(json!({"kernel": kernel, "dtype": $name, "m": m, "n": n, "time_us": us, "gb_per_s": gbs, "copy_gb_per_s": copy_gbs}));
                }
            }};
        }
        bench_dtype!(f32, "f32");
        bench_dtype!(u16, "bf16");
    }
    Ok(rows_out)
}
