//! `gpu-check`: one prepared program for a machine with an NVIDIA GPU and no Rust toolchain.
//!
//! Built here (`cargo build --release --bin gpu-check`), carried to the GPU machine, run as
//! `gpu-check OUT_DIR` (or through `tools/gpu-check/run.sh`, which also runs the PyTorch
//! baselines). It:
//! 1. lists the devices and whether libcuda and libnvrtc load;
//! 2. runs every CUDA test case against the f64 CPU reference (the same check bodies the test
//!    suite runs on the CPU and wgpu), compiles every module with NVRTC, and checks the bf16
//!    model against the CPU (`model_cases`);
//! 3. times the kernel micro-benchmarks with CUDA events, beside a device-to-device copy of the
//!    same bytes as the bandwidth peer measured in the same run, and the LoRA GEMM and NF4
//!    kernels beside cuBLAS on the same shapes (`gemm_bench.rs`);
//! 4. prints a short table and writes `OUT_DIR/gpu-check.json`.
//!
//! Exit status: 0 when every case passed, 1 when one failed, 2 when no CUDA device was found.
//! `gpu-check OUT_DIR --checks` runs the test cases alone (step 2: what the CPU CUDA emulator
//! of `tools/cuda-emu` runs) and writes `OUT_DIR/checks.json`; `gpu-check OUT_DIR --benches`
//! runs the benchmarks alone (step 3; run.sh times them first, before the CPU-heavy checks).
//! `gpu-check OUT_DIR --sm90-smoke [gemm|attention|attention-bwd]` runs only the cases of Hopper's kernels
//! (`sm90_cases`): both parts, or the one named.
//! Later kernels add their cases to `cases()` and their benchmarks to the `groups` in `main`.

mod attention_bench;
mod gemm_bench;
mod norm_bench;
mod sm90_probe;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use serde_json::{json, Value};
use tuna::device::cuda::{self, CudaRuntime};
use tuna::kernels::optim::{self, AdamWParams, Sm3Params};
use tuna::testing::optim::{check_adamw, check_sm3, check_sm3_sparse, check_sum_squares, AdamWCase, Sm3Case};
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
        // Machine code (TUNA_SASS=1 builds): per module, the archs whose cubin is embedded.
        "embedded_sass": cuda::modules().iter().map(|m| (m.name, m.sass.iter().map(|(a, _)| *a).collect::<Vec<_>>())).collect::<std::collections::BTreeMap<_, _>>(),
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

    if std::env::args().nth(2).as_deref() == Some("--sm90-smoke") {
        // run.sh's first step, under a time limit, once per part: Hopper's kernels on their
        // own, so that a broken or hanging one is turned off (TUNA_SM90_OFF) for the rest of
        // the run instead of failing it.
        use tuna::device::cuda::hopper::Part;
        let parts: Vec<Part> = match std::env::args().nth(3) {
            None => Part::ALL.to_vec(),
            Some(name) => match Part::ALL.into_iter().find(|p| p.name() == name) {
                Some(p) => vec![p],
                None => {
                    eprintln!("gpu-check: --sm90-smoke takes gemm, attention or attention-bwd, not `{name}`");
                    return ExitCode::from(2);
                }
            },
        };
        let mut failed = 0;
        let mut ran = 0;
        sm90_cases(
            &mut |name, r| {
                ran += 1;
                failed += usize::from(r.is_err());
                println!("  {:<4} {:<44} {}", if r.is_ok() { "ok" } else { "FAIL" }, name, r.err().unwrap_or_default());
            },
            &parts,
        );
        let names: Vec<&str> = parts.iter().map(|p| p.name()).collect();
        println!("sm90 smoke ({}): {} of {ran} cases passed{}", names.join(", "), ran - failed, if ran == 0 { " (not a compute capability 9.0 device, or the part is off)" } else { "" });
        return if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let mode = std::env::args().nth(2);
    let mut failed = 0;
    let mut results = Vec::new();
    if mode.as_deref() != Some("--benches") {
        println!("\ntests (against the f64 CPU reference; each line as its case ends):");
        results = cases();
        failed = results.iter().filter(|r| !r.ok).count();
        report["tests"] = results.iter().map(|r| json!({"name": r.name, "ok": r.ok, "detail": r.detail})).collect();
    }
    if mode.as_deref() == Some("--checks") {
        // The test cases alone (as on the CPU CUDA emulator, tools/cuda-emu, where timings mean
        // nothing). Their own report, so a `--benches` run into the same folder keeps its own.
        write_report_named(&out_dir, "checks.json", &report);
        println!("\n{} of {} cases passed", results.len() - failed, results.len());
        return if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    // The report is rewritten after the tests and after each group of benchmarks (marked
    // `partial`), so a run cut short by a time limit still leaves what it measured.
    report["partial"] = json!("written after the tests");
    write_report(&out_dir, &report);

    type Group = fn(&Arc<CudaRuntime>) -> tuna::Result<Vec<Value>>;
    let bytes_header = format!("  {:<38} {:>10} {:>10} {:>12}", "kernel", "time µs", "GB/s", "of copy bw");
    let groups: [(&str, Option<&str>, Group); 6] = [
        ("benchmarks (median of 20 after 3 warm-up runs, CUDA events):", Some(&bytes_header), norm_bench::rmsnorm_benches),
        ("Qwen3's q/k norm and RoPE, fused against the two kernels (bf16, D = 128):", None, norm_bench::norm_rope_benches),
        ("optimizer steps (bytes each step must move; target: >= 85% of copy bandwidth):", Some(&bytes_header), optim_benches),
        ("LoRA GEMM and NF4 against cuBLAS, bf16 (Llama-3-8B shapes, R = 16):", None, gemm_bench::lora_benches),
        ("flash attention forward and backward, bf16 (B·T = 16k, H·D = 2048; FlashAttention's FLOP count):", None, attention_bench::attention_benches),
        ("attention for one query row over a KV cache (decoding; H 32 over G 8, D 128, bf16):", None, attention_bench::decode_benches),
    ];
    let mut benches = Vec::new();
    for (title, header, run) in groups {
        println!("\n{title}");
        if let Some(h) = header {
            println!("{h}");
        }
        match run(&rt) {
            Ok(b) => benches.extend(b),
            Err(e) => {
                println!("  error: {e}");
                failed += 1;
            }
        }
        report["benchmarks"] = Value::Array(benches.clone());
        report["partial"] = json!(format!("written after: {title}"));
        write_report(&out_dir, &report);
    }
    if let Some(m) = report.as_object_mut() {
        m.remove("partial");
    }
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    report["failed"] = json!(failed);
    write_report(&out_dir, &report);
    if mode.as_deref() == Some("--benches") {
        println!("\n{failed} benchmark groups failed");
    } else {
        println!("\n{} of {} cases passed", results.len() - failed.min(results.len()), results.len());
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write_report(dir: &std::path::Path, report: &Value) {
    write_report_named(dir, "gpu-check.json", report)
}

/// Writes `report` to `dir/name` through a temporary file and a rename.
fn write_report_named(dir: &std::path::Path, name: &str, report: &Value) {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
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
        // Printed as each case ends, so a run cut short by its time limit still shows how far
        // it got.
        println!("  {:<4} {:<44} {}", if r.is_ok() { "ok" } else { "FAIL" }, name, r.as_ref().err().map_or("", |e| e.as_str()));
        out.push(match r {
            Ok(()) => CaseResult { name, ok: true, detail: String::new() },
            Err(e) => CaseResult { name, ok: false, detail: e },
        })
    };
    for m in cuda::modules() {
        for cc in m.only_cc.map_or(vec![80, 90], |cc| vec![cc]) {
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
    optim_cases(&mut push);
    lora_cases(&mut push, "", false);
    // run.sh ran them first on their own (`--sm90-smoke`) and says so.
    if std::env::var("TUNA_SM90_CHECKED").as_deref() != Ok("1") {
        sm90_cases(&mut push, &tuna::device::cuda::hopper::Part::ALL);
    }
    token_op_cases(&mut push);
    {
        use tuna::kernels::attention::cuda::{BwdKernel, FwdKernel};
        attention_cases(&mut push, &[(Some(FwdKernel::Sync), Some(BwdKernel::Sync)), (Some(FwdKernel::Pipelined), None)]);
        attention_cases_of(&mut push, &[(Some(FwdKernel::SplitKv), None)], &DECODE_SHAPES);
    }
    model_cases(&mut push);
    out
}

/// The model on CUDA (bf16, f32 adapters) against the CPU: the fused loss alone, then loss and
/// LoRA gradients (plain, dropout, packed, checkpointed), five training steps and logits
/// through the KV cache (`tuna::testing::model`, the bodies `tests/model_devices.rs` runs on
/// wgpu). A panic inside one is reported as that case's failure, so the benchmarks still run.
fn model_cases(push: &mut impl FnMut(String, Result<(), String>)) {
    use tuna::testing::model as mc;
    let dev = Device::Cuda(0);
    // Runs one check; a passing one's summary (its largest errors) joins the case's name.
    let mut run = |name: String, f: &dyn Fn() -> Result<String, String>| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(summary)) => push(format!("{name}: {summary}"), Ok(())),
        Ok(Err(e)) => push(name, Err(e)),
        Err(p) => {
            let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            push(name, Err(format!("panicked: {why}")))
        }
    };
    for (i, &(m, h, v, chunk)) in [(1, 64, 7, None), (37, 128, 1000, Some(16)), (300, 256, 5000, None), (2048, 512, 32000, Some(512))].iter().enumerate() {
        run(format!("linear cross-entropy bf16 M {m} H {h} V {v} chunk {chunk:?}"), &|| mc::check_linear_ce_bf16(&dev, (m, h, v), chunk, i as u64));
    }
    run("model bf16: loss and LoRA gradients vs cpu".into(), &|| mc::check_loss_and_grads(&dev, DType::BF16));
    run("model bf16: 5 training steps (LoRA, QLoRA, full, head, sparse) vs cpu".into(), &|| mc::check_training(&dev, DType::BF16));
    run("model bf16: logits through the KV cache vs cpu".into(), &|| mc::check_cached_logits(&dev, DType::BF16));
}

/// The CUDA flash attention against the f64 reference over `ATTENTION_SHAPES`: head dims 32,
/// 64, 96, 128 and 256, causal or not, GQA, a KV-cache offset, a sliding window, packed rows, ragged
/// lengths; see `attention_cases_of`.
fn attention_cases(push: &mut impl FnMut(String, Result<(), String>), kernels: &[(Option<tuna::kernels::attention::cuda::FwdKernel>, Option<tuna::kernels::attention::cuda::BwdKernel>)]) {
    attention_cases_of(push, kernels, &ATTENTION_SHAPES);
}

/// An attention shape of the checks: (B, T, S, H, G, causal, window, packed).
type AttentionShape = (usize, usize, usize, usize, usize, bool, Option<usize>, bool);

const ATTENTION_SHAPES: [AttentionShape; 9] = [
    (1, 1, 1, 1, 1, true, None, false),
    (2, 70, 70, 4, 4, true, None, false),
    (1, 200, 200, 8, 2, true, None, false),
    (1, 130, 130, 4, 1, false, None, false),
    (1, 33, 300, 4, 2, true, None, false),
    (2, 150, 150, 4, 2, true, Some(50), false),
    (2, 120, 120, 4, 4, true, None, true),
    (1, 1024, 1024, 2, 1, true, None, false),
    // More queries than keys without causal: the first sit before key 0 (a window sees all).
    (1, 90, 40, 4, 2, false, Some(20), false),
];

/// Decoding shapes for the split-KV forward: a few query rows per key/value head (up to its 16)
/// over caches of one to several chunks of 256 keys, GQA groups of 1 to 16 query heads.
const DECODE_SHAPES: [AttentionShape; 8] = [
    (1, 1, 1, 1, 1, true, None, false),
    (2, 1, 700, 8, 2, true, None, false),
    (1, 4, 1500, 8, 2, true, None, false),
    (1, 2, 600, 4, 4, true, Some(100), false),
    (1, 3, 257, 12, 3, false, None, false),
    (1, 1, 513, 16, 1, true, None, false),
    (2, 1, 256, 32, 8, true, None, false),
    (1, 4, 3, 4, 2, false, Some(2), false),
];

/// The attention cases over `shapes` (each at every head dim) with each (forward, backward)
/// kernel pair of `kernels` (None: that direction is not run; the backward reads the reference
/// O and lse either way; the Hopper kernels at their head dims only), bf16, and f16 too on the
/// first shapes.
fn attention_cases_of(push: &mut impl FnMut(String, Result<(), String>), kernels: &[(Option<tuna::kernels::attention::cuda::FwdKernel>, Option<tuna::kernels::attention::cuda::BwdKernel>)], shapes: &[AttentionShape]) {
    use tuna::kernels::attention::AttentionParams;
    use tuna::testing::attention::{check_flash_attention_cuda, FaCase};
    use tuna::kernels::attention::cuda::{BwdKernel, FwdKernel};
    for &(kernel, bwd) in kernels {
        for d in tuna::kernels::attention::cuda::HEAD_DIMS {
            if (kernel == Some(FwdKernel::Hopper) || bwd == Some(BwdKernel::Hopper)) && !tuna::kernels::attention::cuda::HOPPER_HEAD_DIMS.contains(&d) {
                continue;
            }
            // The pipelined forward stops at 128 (256 is the first kernel's, in column halves).
            if kernel == Some(FwdKernel::Pipelined) && d > 128 {
                continue;
            }
            for (i, &(batch, q_len, kv_len, heads, kv_heads, causal, window, packed)) in shapes.iter().enumerate() {
                let p = AttentionParams { batch, q_len, kv_len, heads, kv_heads, head_dim: d, causal, window, scale: 1.0 / (d as f32).sqrt() };
                // f16 on the first shapes (the model runs bf16 on CUDA; f16 is the library's too).
                let dtypes: &[DType] = if i < 3 { &[DType::BF16, DType::F16] } else { &[DType::BF16] };
                for &dtype in dtypes {
                    let dirs = [kernel.map(|k| format!("fwd ({k:?})")), bwd.map(|k| format!("bwd ({k:?})"))];
                    let dirs: Vec<String> = dirs.into_iter().flatten().collect();
                    let name = format!("flash attn {} {dtype} D{d} B{batch} T{q_len} S{kv_len} H{heads}/G{kv_heads}{}{}{}", dirs.join("+"), if causal { " causal" } else { "" }, window.map_or(String::new(), |w| format!(" window {w}")), if packed { " packed" } else { "" });
                    push(name, check_flash_attention_cuda(0, &FaCase { p, packed, seed: i as u64, kernel, bwd, dtype }));
                }
            }
        }
    }
}

/// RoPE, the gated linear unit, embedding and greedy decoding's argmax: the bodies `tests/ops_devices.rs` runs on the CPU and wgpu,
/// here in f32 and bf16 and at training sizes too (Llama-7B-like D = 128 with 32 heads, F =
/// 11008, a 32000-token vocabulary with T = 4096).
fn token_op_cases(push: &mut impl FnMut(String, Result<(), String>)) {
    use tuna::kernels::elementwise::{GluAct, GluParams};
    use tuna::testing::token_ops::{check_embedding, check_rope, check_rope_angles, check_glu, RopeCase};
    let dev = Device::Cuda(0);
    let mut positions: Vec<i32> = (0..4096).collect();
    positions.extend((0..=(1 << 20)).step_by(97));
    for freq in [1.0, 0.749_894_2, 1e-4] {
        push(format!("rope cos/sin to 2^20 rad, inv_freq {freq}"), check_rope_angles(dev, &positions, freq));
    }
    for dtype in [DType::F32, DType::BF16] {
        let ropes = [(1, 1, 2, 1), (3, 2, 6, 10), (7, 5, 130, 4096), (40, 4, 32, 1 << 20), (4096, 32, 128, 4096), (8192, 8, 128, 131_072)];
        for (i, &(tokens, heads, head_dim, max_position)) in ropes.iter().enumerate() {
            let case = RopeCase { tokens, heads, head_dim, max_position, dtype, seed: i as u64 };
            push(format!("rope {dtype} [{tokens}, {heads}, {head_dim}] positions < {max_position}"), check_rope(dev, case));
        }
        for (i, &(tokens, heads, head_dim)) in [(3, 2, 64), (37, 3, 256), (2048, 16, 128), (8192, 8, 128)].iter().enumerate() {
            let case = RopeCase { tokens, heads, head_dim, max_position: 32768, dtype, seed: i as u64 };
            for train_w in [false, true] {
                push(format!("rmsnorm+rope {dtype} [{tokens}, {heads}, {head_dim}] w trained {train_w}"), tuna::testing::check_rmsnorm_rope(dev, case, train_w));
            }
        }
        for (i, &(rows, cols)) in [(1, 1), (3, 7), (4, 257), (130, 64), (70_000, 3), (2048, 11008)].iter().enumerate() {
            for packed in [false, true] {
                for act in [GluAct::Silu, GluAct::GeluTanh] {
                    push(format!("glu {act:?} {dtype} [{rows}, {cols}] packed {packed}"), check_glu(dev, dtype, GluParams { rows, cols, act }, packed, i as u64));
                }
            }
        }
        for (i, v) in [1usize, 300, 128_256].into_iter().enumerate() {
            push(format!("greedy argmax {dtype} V {v}, the CPU's picks"), tuna::testing::argmax::check_argmax(dev, dtype, v, i as u64).map(|_| ()));
        }
        let embeds = [(1, 1, 1), (5, 1, 3), (300, 7, 260), (700, 50, 33), (4096, 32000, 512), (4096, 3, 64)];
        for (i, &(tokens, vocab, dim)) in embeds.iter().enumerate() {
            push(format!("embedding {dtype} T {tokens} V {vocab} E {dim}"), check_embedding(dev, dtype, tokens, vocab, dim, i as u64));
        }
    }
    gemm_user_cases(push, "");
    for dtype in [DType::F32, DType::BF16] {
        for (i, (m, n)) in [(1, 1), (37, 301), (4096, 2048)].into_iter().enumerate() {
            push(format!("add/scale {dtype} [{m}, {n}], bit-exact"), tuna::testing::token_ops::check_add_scale(dev, dtype, m, n, i as u64));
        }
    }
    for (i, n) in [21usize, 4097, 1 << 22].into_iter().enumerate() {
        push(format!("casts f32/f16/bf16, {n} elements, bit-exact"), tuna::testing::cast::check_cast(dev, n, i as u64));
    }
}

/// The GEMM's other callers: `matmul` in all four transpositions (a transposed a, as for dW =
/// dYᵀ·X, through the transpose kernel; f32-accumulated outputs), and sparse fine-tuning's
/// linear (the apply and gather kernels around the GEMMs: the cases of tests/ops_devices.rs and
/// 1% of a 1024 x 1024 weight at 512 tokens). `tag` joins each name.
fn gemm_user_cases(push: &mut impl FnMut(String, Result<(), String>), tag: &str) {
    use tuna::testing::sparse::{check_sparse_linear, SparseCase};
    let dev = Device::Cuda(0);
    for (i, mnk) in [(1, 1, 1), (5, 67, 33), (70, 9, 130), (1024, 512, 2048)].into_iter().enumerate() {
        push(format!("matmul bf16 {mnk:?}, every transposition{tag}"), tuna::testing::token_ops::check_matmul(dev, DType::BF16, mnk, i as u64));
    }
    let larger = SparseCase { batch: 2, m: 512, n: 1024, k: 1024, nnz: 10486, bias: false, weight_grad: true };
    for (i, c) in tuna::testing::sparse::CASES.into_iter().chain([larger]).enumerate() {
        push(format!("sparse_linear bf16 m {} n {} k {} nnz {} bias {} dW {}{tag}", c.m, c.n, c.k, c.nnz, c.bias, c.weight_grad), check_sparse_linear(dev, DType::BF16, c, i as u64));
    }
}

/// Hopper's kernels, the parts asked for that are on: the attention forward and backward
/// (`flash_attention_sm90.cu`) on the attention cases at head dims 64 and 128; the GEMM path
/// (`lora::sm90`, wgmma and TMA) forced onto every GEMM whose operands the TMA can read,
/// whatever its size, so the small ragged shapes test its tails: an exact probe, the LoRA and
/// NF4 LoRA cases, the GEMM's other callers, and the model's loss and LoRA gradients against
/// the CPU (its attention on the Hopper kernels too, unless those parts are off).
/// Empty unless the device is compute capability 9.0 and the path is on; leaves its mode as
/// found.
fn sm90_cases(push: &mut impl FnMut(String, Result<(), String>), parts: &[tuna::device::cuda::hopper::Part]) {
    use tuna::device::cuda::hopper::{self as sm90, Mode, Part};
    use tuna::kernels::lora::sm90::launched;
    let on_hopper = cuda::runtime(0).is_ok_and(|rt| rt.modules.compute_capability() == 90);
    let asked = |part: Part| on_hopper && parts.contains(&part) && sm90::mode_for(part) != Mode::Off;
    {
        use tuna::kernels::attention::cuda::{BwdKernel, FwdKernel};
        // Each direction alone, so that neither part's verdict depends on another kernel.
        if asked(Part::Attention) {
            attention_cases(push, &[(Some(FwdKernel::Hopper), None)]);
        }
        if asked(Part::AttentionBackward) {
            attention_cases(push, &[(None, Some(BwdKernel::Hopper))]);
        }
    }
    if !asked(Part::Gemm) {
        return;  // not an H100/H200, or the run turned the GEMM path off (TUNA_SM90=0, TUNA_SM90_OFF=gemm)
    }
    let entry = sm90::mode();
    sm90::set_mode(Mode::Force);
    if let Ok(rt) = cuda::runtime(0) {
        for b_kn in [false, true] {
            push(format!("sm90 GEMM probe: identity x integer pattern, B stored {}, exact", if b_kn { "[K, N]" } else { "[N, K]" }), sm90_probe::probe(&rt, b_kn));
        }
    }
    lora_cases(push, " [sm90]", true);
    gemm_user_cases(push, " [sm90]");
    let dev = Device::Cuda(0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tuna::testing::model::check_loss_and_grads(&dev, DType::BF16)));
    match r {
        Ok(r) => push("model bf16: loss and LoRA gradients vs cpu [sm90]".into(), r.map(|_| ())),
        Err(_) => push("model bf16: loss and LoRA gradients vs cpu [sm90]".into(), Err("panicked".into())),
    }
    sm90::set_mode(entry);
    let (refused, launched) = (sm90::refused(), launched());
    push(format!("sm90: {launched} GEMMs ran on the sm_90a kernels, {refused} refused by the driver"), match (refused, launched) {
        (0, 1..) => Ok(()),
        (0, 0) => Err("no GEMM took the path: the cases above tested mma.sync".into()),
        _ => Err(format!("{refused} GEMMs or attention forwards fell back to mma.sync")),
    });
}

/// The fused LoRA and NF4 cases: the bodies `tests/lora_devices.rs` runs on the CPU and wgpu,
/// here in bf16 and f16. Shapes: ragged in every dimension, K a multiple of 8 (the cp.async
/// path) and not (element loads), R up to 128, M <= 16 (the NF4 GEMV) and just above.
/// With `gemm_only`, the LoRA and NF4 LoRA cases alone (no dropout, quantization or
/// dequantization kernels); `tag` joins each name.
fn lora_cases(push: &mut impl FnMut(String, Result<(), String>), tag: &str, gemm_only: bool) {
    use tuna::testing::lora::{check_dropout, check_lora, check_nf4_dequant, check_nf4_lora, check_nf4_quantize, LoraCase};
    let dev = Device::Cuda(0);
    let shapes = [
        (1, 1, 1, 1),
        (3, 65, 33, 128),
        (67, 5, 70, 100),
        (130, 130, 130, 16),
        (129, 200, 264, 16),
        (256, 256, 512, 64),
        (1, 300, 256, 16),
        (16, 129, 520, 8),
        (17, 64, 64, 16),
        (300, 72, 1000, 7),
        // Many tokens, small N and K: dA (M = R) and dB (N = R) split along the tokens (split-K).
        (4096, 64, 64, 16),
    ];
    for dtype in [DType::BF16, DType::F16] {
        for (i, &(m, n, k, r)) in shapes.iter().enumerate() {
            let case = LoraCase { m, n, k, r, bias: i % 2 == 0, scale: 16.0 / r as f32, dtype, seed: i as u64, dropout: None };
            push(format!("lora {dtype} m{m} n{n} k{k} r{r}{tag}"), check_lora(dev, case));
            push(format!("nf4 lora {dtype} m{m} n{n} k{k} r{r}{tag}"), check_nf4_lora(dev, case));
            if gemm_only {
                continue;
            }
            if dtype == DType::BF16 {
                let dropped = LoraCase { dropout: Some((0.1, 7 + i as u64)), ..case };
                push(format!("lora {dtype} m{m} n{n} k{k} r{r} dropout 0.1"), check_lora(dev, dropped));
                push(format!("nf4 lora {dtype} m{m} n{n} k{k} r{r} dropout 0.1"), check_nf4_lora(dev, dropped));
            }
        }
    }
    if gemm_only {
        return;
    }
    for (i, len) in [1usize, 65, 1001, 64 * 256 + 7, 4096 * 4096].into_iter().enumerate() {
        push(format!("nf4 dequantize {len}"), check_nf4_dequant(dev, len, i as u64));
        for dt in [DType::F32, DType::BF16] {
            push(format!("nf4 quantize {dt} {len}"), check_nf4_quantize(dev, dt, len, i as u64));
        }
    }
    for (seed, p) in [(0u64, 0.1f32), (0x9e37_79b9_7f4a_7c15, 0.5), (u64::MAX, 0.05)] {
        push(format!("lora dropout f32/bf16 (and axpy), seed {seed:#x} p {p}, bit-exact"), check_dropout(dev, 1 << 20, p, seed));
    }
}

/// The optimizer-step cases: the bodies `tests/optim_devices.rs` runs on the CPU and wgpu.
fn optim_cases(push: &mut impl FnMut(String, Result<(), String>)) {
    let dev = Device::Cuda(0);
    let shapes = [(1, 1), (7, 1), (300, 1), (1, 300), (3, 5), (17, 33), (65, 129), (40, 257), (1000, 1000), (130, 4097)];
    let storages = [(DType::F32, false), (DType::BF16, true), (DType::BF16, false)];
    for (dtype, master) in storages {
        for (k, &(rows, cols)) in shapes.iter().enumerate() {
            for momentum in [false, true] {
                let case = Sm3Case {
                    rows,
                    cols,
                    momentum,
                    weight_decay: 0.1,
                    grad_scale: 0.5,
                    device_clip: None,
                    steps: 3,
                    dtype,
                    master,
                    seed: k as u64,
                };
                push(format!("sm3 {dtype}{} [{rows}, {cols}] momentum {momentum}", if master { "+master" } else { "" }), check_sm3(dev, case));
            }
        }
        for (k, &n) in [1usize, 257, 5000, 1 << 20].iter().enumerate() {
            for device_clip in [None, Some(1.0)] {
                let case = AdamWCase { n, weight_decay: 0.01, grad_scale: 0.8, device_clip, steps: 3, dtype, master, seed: k as u64 };
                push(format!("adamw {dtype}{} n={n} clip {device_clip:?}", if master { "+master" } else { "" }), check_adamw(dev, case));
            }
        }
    }
    for max_norm in [2.0, 100.0] {
        let base = Sm3Case {
            rows: 20,
            cols: 30,
            momentum: true,
            weight_decay: 0.0,
            grad_scale: 0.5,
            device_clip: Some(max_norm),
            steps: 3,
            dtype: DType::F32,
            master: false,
            seed: 7,
        };
        push(format!("sm3 device clip max_norm {max_norm}"), check_sm3(dev, base));
    }
    for (k, &(rows, cols, nnz)) in [(1, 1, 1), (10, 12, 5), (10, 12, 60), (33, 17, 561), (64, 300, 900), (4096, 4096, 100_000)].iter().enumerate() {
        for momentum in [false, true] {
            push(format!("sm3_sparse [{rows}, {cols}] {nnz} active momentum {momentum}"), check_sm3_sparse(dev, rows, cols, nnz, momentum, 3, k as u64));
        }
    }
    push("sum of squares, 4 buffers".into(), check_sum_squares(dev, &[1, 300, 0, 70_000], 1.0, 3));
    push("sum of squares, 16M".into(), check_sum_squares(dev, &[16 << 20], 1.0, 5));
    let many: Vec<usize> = (0..93).map(|k| if k % 11 == 5 { 0 } else { 1 + k * 37 % 2000 }).collect();
    push("sum of squares, 93 buffers (3 launches)".into(), check_sum_squares(dev, &many, 1.0, 6));
    // A Llama-3.2-1B LoRA step's factors: 16 layers x 7 linears x (A, B), r = 16.
    let lora: Vec<usize> = (0..16).flat_map(|_| [2048, 2048, 2048, 512, 2048, 512, 2048, 2048, 2048, 8192, 2048, 8192, 8192, 2048]).map(|d| 16 * d).collect();
    for (dtype, master) in [(DType::F32, true), (DType::BF16, true), (DType::F32, false)] {
        push(
            format!("adamw_multi {dtype}{} over a Llama-1B LoRA step's 224 factors, bits of the one-tensor kernel", if master { "+master" } else { "" }),
            tuna::testing::optim::check_adamw_multi(dev, &lora, dtype, master, 2, 8),
        );
    }
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

/// Bandwidth of the optimizer steps over 1M, 16M, 256M and 1G parameters (SM3 as `[n/4096, 4096]`; 24 GB at 1G),
/// through the public launchers, beside a device-to-device copy of one f32 parameter buffer.
/// Bytes per parameter that each step must move: SM3 f32 without momentum reads w, g and
/// writes w (12); with momentum also reads and writes m (20); bf16 with f32 master and
/// momentum reads master, g (2), m and writes master, w (2), m (20); AdamW f32 reads w, g, m, v
/// and writes w, m, v (28), bf16 + master the same 28; the sum of squares reads g (4). SM3
/// also moves its accumulators: 8·(R + C) bytes, plus their zeroing.
fn optim_benches(rt: &Arc<CudaRuntime>) -> tuna::Result<Vec<Value>> {
    const COLS: usize = 4096;
    let mut rows_out = Vec::new();
    let s = &rt.stream;
    let md = &rt.modules;
    let e = |e: cudarc::driver::DriverError| tuna::Error::Cuda { context: "optim bench".into(), message: format!("{e:?}") };
    let sm3p = Sm3Params { lr: 1e-3, eps: 1e-8, beta1: 0.9, weight_decay: 0.01, grad_scale: 1.0 };
    let sm3p_nomom = Sm3Params { beta1: 0.0, ..sm3p };
    let adamp = AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 10, grad_scale: 1.0 };
    for n in [1usize << 20, 16 << 20, 256 << 20, 1 << 30] {
        let rows = n / COLS;
        let mut w = alloc::<f32>(s, n)?;
        let g = alloc::<f32>(s, n)?;
        let mut m = alloc::<f32>(s, n)?;
        let mut v = alloc::<f32>(s, n)?;
        let mut wb = alloc::<u16>(s, n)?;
        let gb = alloc::<u16>(s, n)?;
        let (r, c) = (alloc::<f32>(s, rows)?, alloc::<f32>(s, COLS)?);
        let (mut r2, mut c2) = (alloc::<f32>(s, rows)?, alloc::<f32>(s, COLS)?);
        let mut ss = alloc::<f64>(s, 1)?;
        let copy_us = {
            let mut dst = alloc::<f32>(s, n)?;
            time_us(rt, || s.memcpy_dtod(&g, &mut dst).map_err(e))?
        };
        let copy_gbs = (8 * n) as f64 / copy_us / 1e3;
        let acc = (8 * (rows + COLS)) as f64;
        let mut results: Vec<(&str, f64, f64)> = vec![("memcpy_dtod (peer)", copy_us, (8 * n) as f64)];
        let us = time_us(rt, || {
            optim::cuda::sm3::<f32>(s, md, &mut w.slice_mut(..), &g.slice(..), None, &r.slice(..), &c.slice(..), &mut r2.slice_mut(..), &mut c2.slice_mut(..), None, rows, COLS, sm3p_nomom, None)
        })?;
        results.push(("sm3 f32", us, 12.0 * n as f64 + acc));
        let us = time_us(rt, || {
            let mut mv = m.slice_mut(..);
            optim::cuda::sm3::<f32>(s, md, &mut w.slice_mut(..), &g.slice(..), None, &r.slice(..), &c.slice(..), &mut r2.slice_mut(..), &mut c2.slice_mut(..), Some(&mut mv), rows, COLS, sm3p, None)
        })?;
        results.push(("sm3 f32 momentum", us, 20.0 * n as f64 + acc));
        let us = time_us(rt, || {
            let (mut mv, mut master) = (m.slice_mut(..), v.slice_mut(..));
            optim::cuda::sm3::<u16>(s, md, &mut wb.slice_mut(..), &gb.slice(..), Some(&mut master), &r.slice(..), &c.slice(..), &mut r2.slice_mut(..), &mut c2.slice_mut(..), Some(&mut mv), rows, COLS, sm3p, None)
        })?;
        results.push(("sm3 bf16+master momentum", us, 20.0 * n as f64 + acc));
        let us = time_us(rt, || optim::cuda::adamw::<f32>(s, md, &mut w.slice_mut(..), &g.slice(..), None, &mut m.slice_mut(..), &mut v.slice_mut(..), adamp, None))?;
        results.push(("adamw f32", us, 28.0 * n as f64));
        // bf16 + master reuses w (f32) as the master copy.
        let us = time_us(rt, || {
            let mut master = w.slice_mut(..);
            optim::cuda::adamw::<u16>(s, md, &mut wb.slice_mut(..), &gb.slice(..), Some(&mut master), &mut m.slice_mut(..), &mut v.slice_mut(..), adamp, None)
        })?;
        results.push(("adamw bf16+master", us, 28.0 * n as f64));
        let us = time_us(rt, || {
            let clip = optim::cuda::DeviceClip { sum_sq: ss.slice(..), max_norm: 1.0 };
            optim::cuda::adamw::<f32>(s, md, &mut w.slice_mut(..), &g.slice(..), None, &mut m.slice_mut(..), &mut v.slice_mut(..), adamp, Some(&clip))
        })?;
        results.push(("adamw f32 device clip", us, 28.0 * n as f64));
        let us = time_us(rt, || optim::cuda::sum_squares::<f32>(s, md, &[g.slice(..)], &mut ss.slice_mut(..)))?;
        results.push(("sum_squares f32", us, 4.0 * n as f64));
        for (kernel, us, bytes) in results {
            let gbs = bytes / us / 1e3;
            let name = format!("{kernel} {}M", n >> 20);
            println!("  {:<38} {:>10.1} {:>10.0} {:>11.0}%", name, us, gbs, 100.0 * gbs / copy_gbs);
            rows_out.push(json!({
                "kernel": kernel, "params": n, "time_us": us, "bytes": bytes, "gb_per_s": gbs,
                "copy_gb_per_s": copy_gbs, "of_copy": gbs / copy_gbs, "meets_85pct": gbs >= 0.85 * copy_gbs,
            }));
        }
    }
    // A Llama-3.2-1B LoRA step's AdamW: 224 factors of 8K-131K parameters (r = 16), a launch
    // each against `adamw_multi`'s 40 tensors a launch (both f32, in place, same bits).
    let sizes: Vec<usize> = (0..16).flat_map(|_| [2048, 2048, 2048, 512, 2048, 512, 2048, 2048, 2048, 8192, 2048, 8192, 8192, 2048]).map(|d| 16 * d).collect();
    let total: usize = sizes.iter().sum();
    let bufs = |_: ()| -> tuna::Result<Vec<CudaSlice<f32>>> { sizes.iter().map(|&n| alloc::<f32>(s, n)).collect() };
    let (mut w, g, mut m, mut v) = (bufs(())?, bufs(())?, bufs(())?, bufs(())?);
    let one_us = time_us(rt, || {
        for k in 0..sizes.len() {
            optim::cuda::adamw::<f32>(s, md, &mut w[k].slice_mut(..), &g[k].slice(..), None, &mut m[k].slice_mut(..), &mut v[k].slice_mut(..), adamp, None)?;
        }
        Ok(())
    })?;
    let multi_us = time_us(rt, || {
        let mut tensors: Vec<_> = w.iter_mut().zip(&g).zip(m.iter_mut().zip(v.iter_mut())).map(|((w, g), (m, v))| optim::cuda::AdamWTensor { w: w.slice_mut(..), g: g.slice(..), master: None, m: m.slice_mut(..), v: v.slice_mut(..), half: None }).collect();
        optim::cuda::adamw_multi::<f32>(s, md, &mut tensors, adamp, None)
    })?;
    for (kernel, us) in [("adamw f32, 224 LoRA factors, a launch each", one_us), ("adamw_multi f32, 224 LoRA factors", multi_us)] {
        let gbs = 28.0 * total as f64 / us / 1e3;
        println!("  {:<38} {:>10.1} {:>10.0}", kernel, us, gbs);
        rows_out.push(json!({ "kernel": kernel, "params": total, "tensors": sizes.len(), "time_us": us, "bytes": 28 * total, "gb_per_s": gbs }));
    }
    Ok(rows_out)
}

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(s: &Arc<CudaStream>, n: usize) -> tuna::Result<CudaSlice<T>> {
    s.alloc_zeros::<T>(n).map_err(|e| tuna::Error::Cuda { context: "alloc".into(), message: format!("{e:?}") })
}
