//! The CUDA kernels as built: PTX embedded by build.rs (when nvcc was found) and the NVRTC path
//! that a build without nvcc relies on. Neither needs a GPU.
//!
//! CI sets TUNA_REQUIRE_NVCC=1 and TUNA_REQUIRE_NVRTC=1 so that a missing toolchain is a
//! failure there rather than a silent pass.

use tuna::device::cuda;

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Entry points each module must export (the names the launchers load).
fn entry_points(module: &str) -> &'static [&'static str] {
    match module {
        "rmsnorm" => &[
            "rmsnorm_fwd_f32",
            "rmsnorm_fwd_bf16",
            "rmsnorm_bwd_dx_f32",
            "rmsnorm_bwd_dx_bf16",
            "rmsnorm_bwd_dw_part_f32",
            "rmsnorm_bwd_dw_part_bf16",
            "rmsnorm_bwd_dw_sum_f32",
            "rmsnorm_bwd_dw_sum_bf16",
        ],
        "optim" => &[
            "sm3_dense_f32",
            "sm3_dense_bf16",
            "sm3_sparse_f32",
            "sm3_sparse_finish",
            "adamw_f32",
            "adamw_bf16",
            "adamw_multi_f32",
            "adamw_multi_bf16",
            "sumsq_partial_multi_f32",
            "sumsq_partial_multi_bf16",
            "sumsq_finish",
        ],
        "lora_gemm" => &[
            "lora_gemm_bf16",
            "lora_gemm_f16",
            "lora_gemm_kn_bf16",
            "lora_gemm_kn_f16",
            "nf4_lora_gemm_bf16",
            "nf4_lora_gemm_f16",
            "nf4_lora_gemm_kn_bf16",
            "nf4_lora_gemm_kn_f16",
            "lora_gemm_km_kn_bf16",
            "lora_gemm_km_kn_f16",
            "nf4_gemv_m1_bf16",
            "nf4_gemv_m16_bf16",
            "nf4_gemv_m1_f16",
            "nf4_gemv_m16_f16",
            "gemv_m1_bf16",
            "gemv_m4_bf16",
            "gemv_m1_f16",
            "gemv_m4_f16",
            "nf4_dequant_f32",
            "nf4_absmax_f32",
            "nf4_absmax_bf16",
            "nf4_codes_f32",
            "nf4_codes_bf16",
        ],
        "rope" => &["rope_f32", "rope_bf16"],
        "dropout" => &["dropout_f32", "dropout_bf16", "dropout_axpy_f32", "dropout_axpy_bf16"],
        "cast" => &["cast_f32_f16", "cast_f32_bf16", "cast_f16_f32", "cast_bf16_f32", "cast_f16_bf16", "cast_bf16_f16"],
        "elementwise" => &[
            "glu_fwd_f32",
            "glu_fwd_bf16",
            "glu_bwd_f32",
            "glu_bwd_bf16",
            "glu_bwd_packed_f32",
            "glu_bwd_packed_bf16",
            "add_f32",
            "add_bf16",
            "scale_f32",
            "scale_bf16",
            "scale_by_f32",
            "scale_by_bf16",
            "transpose_b16",
            "transpose_b32",
        ],
        "flash_attention_sm90" => &[
            "flash_attn_fwd_sm90_bf16_d64",
            "flash_attn_fwd_sm90_f16_d64",
            "flash_attn_fwd_sm90_bf16_d128",
            "flash_attn_fwd_sm90_f16_d128",
            "flash_attn_bwd_sm90_bf16_d64",
            "flash_attn_bwd_sm90_f16_d64",
            "flash_attn_bwd_sm90_bf16_d128",
            "flash_attn_bwd_sm90_f16_d128",
        ],
        "gemm_sm90" => &[
            "gemm_sm90_bf16",
            "gemm_sm90_f16",
            "gemm_sm90_kn_bf16",
            "gemm_sm90_kn_f16",
            "gemm_sm90_km_kn_bf16",
            "gemm_sm90_km_kn_f16",
            "nf4_gemm_sm90_bf16",
            "nf4_gemm_sm90_f16",
            "nf4_gemm_sm90_kn_bf16",
            "nf4_gemm_sm90_kn_f16",
        ],
        "cross_entropy" => &["ce_rows_f32", "ce_rows_bf16", "ce_sum_f32", "argmax_rows_f32", "argmax_rows_bf16"],
        "sparse" => &["sparse_apply_f32", "sparse_apply_bf16", "sparse_apply_f16", "sparse_gather_f32", "sparse_gather_bf16", "sparse_gather_f16"],
        "embedding" => &["embedding_fwd_f32", "embedding_fwd_bf16", "embedding_bwd_f32", "embedding_bwd_bf16"],
        "flash_attention" => &[
            "flash_attn_fwd_bf16_d32",
            "flash_attn_fwd_f16_d32",
            "flash_attn_fwd_bf16_d64",
            "flash_attn_fwd_f16_d64",
            "flash_attn_fwd_bf16_d96",
            "flash_attn_fwd_f16_d96",
            "flash_attn_fwd_bf16_d128",
            "flash_attn_fwd_f16_d128",
            "flash_attn_fwd_pipe_bf16_d32",
            "flash_attn_fwd_pipe_f16_d32",
            "flash_attn_fwd_pipe_bf16_d64",
            "flash_attn_fwd_pipe_f16_d64",
            "flash_attn_fwd_pipe_bf16_d96",
            "flash_attn_fwd_pipe_f16_d96",
            "flash_attn_fwd_pipe_bf16_d128",
            "flash_attn_fwd_pipe_f16_d128",
            "flash_attn_bwd_dot_bf16",
            "flash_attn_bwd_dq_bf16",
            "flash_attn_bwd_dot_f16",
            "flash_attn_bwd_dq_f16",
            "flash_attn_bwd_bf16_d32",
            "flash_attn_bwd_f16_d32",
            "flash_attn_bwd_bf16_d64",
            "flash_attn_bwd_f16_d64",
            "flash_attn_bwd_bf16_d96",
            "flash_attn_bwd_f16_d96",
            "flash_attn_bwd_bf16_d128",
            "flash_attn_bwd_f16_d128",
        ],
        "flash_decode" => &[
            "flash_decode_part_bf16_d32",
            "flash_decode_part_f16_d32",
            "flash_decode_merge_bf16_d32",
            "flash_decode_merge_f16_d32",
            "flash_decode_part_bf16_d64",
            "flash_decode_part_f16_d64",
            "flash_decode_merge_bf16_d64",
            "flash_decode_merge_f16_d64",
            "flash_decode_part_bf16_d96",
            "flash_decode_part_f16_d96",
            "flash_decode_merge_bf16_d96",
            "flash_decode_merge_f16_d96",
            "flash_decode_part_bf16_d128",
            "flash_decode_part_f16_d128",
            "flash_decode_merge_bf16_d128",
            "flash_decode_merge_f16_d128",
        ],
        _ => &[],
    }
}

fn assert_entries(module: &str, arch: &str, ptx: &str) {
    assert!(ptx.contains(".version"), "{module} for {arch}: not PTX");
    for e in entry_points(module) {
        assert!(ptx.contains(&format!(".entry {e}(")), "{module} for {arch}: no entry point {e}");
    }
}

#[test]
fn every_module_is_embedded() {
    let names: Vec<&str> = cuda::modules().iter().map(|m| m.name).collect();
    for want in ["rmsnorm", "optim", "lora_gemm", "rope", "dropout", "cast", "elementwise", "embedding", "flash_attention", "flash_decode", "cross_entropy", "sparse", "gemm_sm90", "flash_attention_sm90"] {
        assert!(names.contains(&want), "no module {want} in {names:?}");
    }
    for m in cuda::modules() {
        assert!(!m.source.contains("#include \""), "{}: local includes must be inlined for NVRTC", m.name);
    }
}

#[test]
fn nvcc_ptx_for_sm80_and_sm90() {
    let any = cuda::modules().iter().any(|m| !m.ptx.is_empty());
    if !any {
        assert!(!required("TUNA_REQUIRE_NVCC"), "TUNA_REQUIRE_NVCC=1 but build.rs found no nvcc");
        return;
    }
    for m in cuda::modules() {
        for arch in archs(m) {
            let (_, ptx) = m.ptx.iter().find(|(a, _)| *a == arch).unwrap_or_else(|| panic!("{}: no PTX for sm_{arch}", m.name));
            assert_entries(m.name, &format!("sm_{arch}"), ptx);
            if m.only_cc.is_some() {
                assert!(ptx.contains(&format!(".target sm_{arch}a")), "{}: nvcc output not for sm_{arch}a", m.name);
            }
        }
    }
}

#[test]
fn nvrtc_compiles_every_module() {
    if !cuda::nvrtc_present() {
        assert!(!required("TUNA_REQUIRE_NVRTC"), "TUNA_REQUIRE_NVRTC=1 but libnvrtc was not found");
        return;
    }
    for m in cuda::modules() {
        for cc in archs(m) {
            let ptx = cuda::compile_with_nvrtc(m, cc).unwrap_or_else(|e| panic!("{e}"));
            assert_entries(m.name, &format!("compute_{cc}"), &ptx);
            if m.only_cc.is_some() {
                assert!(ptx.contains(&format!(".target sm_{cc}a")), "{}: NVRTC output not for sm_{cc}a", m.name);
            }
        }
        if m.only_cc.is_some() {
            let err = cuda::compile_with_nvrtc(m, 80).expect_err("an sm_90a module compiled for compute_80");
            assert!(err.to_string().contains("sm_90a alone"), "{err}");
        }
    }
}

/// The archs a module is built for: sm_80 and sm_90, or its one target.
fn archs(m: &cuda::CudaModuleSource) -> Vec<u32> {
    m.only_cc.map_or(vec![80, 90], |cc| vec![cc])
}

/// Which embedded machine code a device runs: the newest arch of its major version not above
/// it (sm_80 code on sm_86 and sm_89 GPUs, sm_90 on 9.0 only), else none (the PTX is loaded).
#[test]
fn machine_code_is_picked_by_compute_capability() {
    static M: cuda::CudaModuleSource =
        cuda::CudaModuleSource { name: "m", source: "", ptx: &[], sass: &[(80, b"eighty"), (86, b"eighty-six"), (90, b"ninety")], only_cc: None };
    let pick = |cc| cuda::sass_for(&M, cc).map(|c| std::str::from_utf8(c).unwrap());
    assert_eq!(pick(75), None);
    assert_eq!(pick(80), Some("eighty"));
    assert_eq!(pick(87), Some("eighty-six"));
    assert_eq!(pick(89), Some("eighty-six"));
    assert_eq!(pick(90), Some("ninety"));
    assert_eq!(pick(100), None, "sm_90 code does not run on a 10.0 GPU");
    assert_eq!(pick(120), None);
}

/// A TUNA_SASS=1 build embeds, for every module and arch it has PTX for, ptxas's machine code
/// holding every entry point (CI builds without it: TUNA_REQUIRE_SASS=1 makes its absence a
/// failure, as a release build for a GPU machine should be checked).
#[test]
fn machine_code_holds_every_entry_point() {
    if cuda::modules().iter().all(|m| m.sass.is_empty()) {
        assert!(!required("TUNA_REQUIRE_SASS"), "TUNA_REQUIRE_SASS=1 but the build embedded no machine code (TUNA_SASS=1 and nvcc needed)");
        return;
    }
    for m in cuda::modules() {
        for arch in archs(m) {
            let (_, code) = m.sass.iter().find(|(a, _)| *a == arch).unwrap_or_else(|| panic!("{}: no machine code for sm_{arch}", m.name));
            assert_eq!(&code[..4], b"\x7fELF", "{} for sm_{arch}: not an ELF cubin", m.name);
            for e in entry_points(m.name) {
                let name = format!("\0{e}\0");
                assert!(code.windows(name.len()).any(|w| w == name.as_bytes()), "{} for sm_{arch}: no symbol {e}", m.name);
            }
        }
    }
}
