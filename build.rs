//! Build script: compiles `kernels-cuda/*.cu` to PTX with nvcc when one is found, embeds the
//! (include-inlined) CUDA sources for NVRTC either way, and inlines the includes of
//! `kernels-wgsl/*.wgsl` into `$OUT_DIR/wgsl/` (what the crate embeds) and validates them with
//! naga. Needs no GPU, CUDA driver or Vulkan driver.
//!
//! nvcc is looked for in: $NVCC, $CUDA_HOME/bin, $PATH, then a pip-installed CUDA 13 toolchain
//! (`python3 -c 'import nvidia.cu13'`). $CUDA_ARCH lists the archs (default "80,90"). Set
//! TUNA_NO_NVCC=1 to skip nvcc and rely on NVRTC at run time. With TUNA_SASS=1 each PTX is
//! also assembled by ptxas (beside nvcc) into machine code for its arch and embedded, so a GPU
//! of that arch loads it without the driver compiling the PTX first (seconds per module, in
//! every process unless the driver's cache keeps it); off by default, since it adds ~23 MB to
//! every binary and test executable.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for var in ["NVCC", "CUDA_HOME", "CUDA_ARCH", "TUNA_NO_NVCC", "TUNA_SASS", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    validate_wgsl(&root.join("kernels-wgsl"), &out.join("wgsl"));
    build_cuda(&root.join("kernels-cuda"), &out);
}

fn sorted_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    files
}

/// Inlines each shader's `#include "part.wgsli"` lines (shared parts, never validated alone)
/// into `out/NAME.wgsl`, which the crate embeds, then parses and validates it; a bad one fails
/// the build with file, line and message (lines of the inlined text). A shader whose storage
/// types are aliases (`alias T = f32;`) is also validated in its f16 forms, every subset of its
/// aliases rewritten (as `device::wgpu::f16_variant` makes them at run time), so they are
/// checked on machines without an f16 adapter too.
fn validate_wgsl(dir: &Path, out: &Path) {
    sorted_files(dir, "wgsli"); // shared parts: rerun-if-changed only
    std::fs::create_dir_all(out).unwrap();
    for path in sorted_files(dir, "wgsl") {
        let src = inline_includes(&path, &mut Vec::new());
        std::fs::write(out.join(path.file_name().unwrap()), &src).unwrap();
        let shown = path.display().to_string();
        validate_one(&src, &shown);
        let aliases: Vec<&str> = src.lines().filter_map(|l| l.trim().strip_prefix("alias ")?.strip_suffix(" = f32;")).collect();
        assert!(aliases.len() <= 4, "{shown}: more than 4 storage-type aliases");
        let sets: Vec<Vec<&str>> = (1..1usize << aliases.len()).map(|bits| aliases.iter().enumerate().filter(|(i, _)| bits >> i & 1 == 1).map(|(_, a)| *a).collect()).collect();
        for set in sets {
            let mut variant = src.clone();
            for a in &set {
                variant = variant.replacen(&format!("alias {a} = f32;"), &format!("alias {a} = f16;"), 1);
            }
            validate_one(&format!("enable f16;\n{variant}"), &format!("{shown} (f16 {})", set.join(", ")));
        }
    }
}

fn validate_one(src: &str, shown: &str) {
    let module = match naga::front::wgsl::parse_str(src) {
        Ok(m) => m,
        Err(e) => panic!("WGSL parse error\n{}", e.emit_to_string_with_path(src, shown)),
    };
    let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
    if let Err(e) = validator.validate(&module) {
        panic!("WGSL validation error\n{}", e.emit_to_string_with_path(src, shown));
    }
}

/// Inlines `#include "local.cuh"` (or `.wgsli`) lines, once each, so NVRTC needs no include
/// path and a WGSL shader is one text.
fn inline_includes(path: &Path, seen: &mut Vec<PathBuf>) -> String {
    let src = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = String::new();
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let name = rest.trim_end_matches('"');
            let inc = path.parent().unwrap().join(name);
            if !seen.contains(&inc) {
                seen.push(inc.clone());
                out.push_str(&inline_includes(&inc, seen));
            }
        } else if t != "#pragma once" {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Assembles `ptx` into machine code for `arch` (sm_80, sm_90a, ...) with the ptxas beside
/// `nvcc`, as the driver would at load time.
fn assemble(nvcc: &Path, ptx: &Path, arch: &str, cubin: &Path) {
    let ptxas = nvcc.with_file_name("ptxas");
    let o = Command::new(&ptxas)
        .args(["-O3", "-lineinfo"])
        .arg(format!("-arch={arch}"))
        .arg(ptx)
        .arg("-o")
        .arg(cubin)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
    if !o.status.success() {
        panic!("ptxas failed on {} for {arch}:\n{}{}", ptx.display(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if std::env::var_os("TUNA_NO_NVCC").is_some_and(|v| v != "0") {
        return None;
    }
    let works = |p: &Path| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    if let Some(p) = std::env::var_os("NVCC").map(PathBuf::from) {
        if works(&p) {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} does not run; looking elsewhere", p.display());
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if works(&p) {
            return Some(p);
        }
    }
    if works(Path::new("nvcc")) {
        return Some(PathBuf::from("nvcc"));
    }
    let py = Command::new("python3")
        .args(["-c", "import nvidia.cu13 as m; print(list(m.__path__)[0])"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let p = PathBuf::from(String::from_utf8_lossy(&py.stdout).trim()).join("bin/nvcc");
    works(&p).then_some(p)
}

/// The compute capability (times 10) a `.cu` file is tied to by a first line `// arch: sm_NNa`.
fn arch_specific(cu: &Path) -> Option<u32> {
    let src = std::fs::read_to_string(cu).unwrap_or_else(|e| panic!("reading {}: {e}", cu.display()));
    let arch = src.lines().next()?.trim().strip_prefix("// arch: sm_")?.strip_suffix('a')?;
    Some(arch.parse().unwrap_or_else(|_| panic!("{}: bad `// arch:` line", cu.display())))
}

fn build_cuda(dir: &Path, out: &Path) {
    let nvcc = find_nvcc();
    let archs: Vec<u32> = std::env::var("CUDA_ARCH")
        .unwrap_or_else(|_| "80,90".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().trim_start_matches("sm_").parse().unwrap_or_else(|_| panic!("CUDA_ARCH: bad arch `{s}`")))
        .collect();
    match &nvcc {
        Some(_) => {}
        None => println!("cargo:warning=tuna: no nvcc found; CUDA kernels will be compiled by NVRTC at run time"),
    }
    let sass = std::env::var("TUNA_SASS").is_ok_and(|v| v == "1");
    if sass && nvcc.is_none() {
        println!("cargo:warning=tuna: TUNA_SASS=1 but no nvcc found: no machine code embedded");
    }
    sorted_files(dir, "cuh"); // headers: rerun-if-changed only
    let mut table = String::from("/// Generated by build.rs: every kernels-cuda/*.cu file.\npub static CUDA_MODULES: &[CudaModuleSource] = &[\n");
    for cu in sorted_files(dir, "cu") {
        let stem = cu.file_stem().unwrap().to_string_lossy().to_string();
        let inlined = out.join(format!("{stem}.inlined.cu"));
        std::fs::write(&inlined, inline_includes(&cu, &mut Vec::new())).unwrap();
        // A file whose first line is `// arch: sm_90a` uses instructions of that target alone
        // (wgmma, TMA's tensor copies): it is compiled for it only, and loads only on a device
        // of that compute capability (`CudaModuleSource::only_cc`).
        let specific = arch_specific(&cu);
        let targets: Vec<(u32, String, String)> = match specific {
            Some(cc) => vec![(cc, format!("compute_{cc}a"), format!("sm_{cc}a"))],
            None => archs.iter().map(|a| (*a, format!("sm_{a}"), format!("sm_{a}"))).collect(),
        };
        let mut ptx_entries = String::new();
        let mut sass_entries = String::new();
        if let Some(nvcc) = &nvcc {
            for (arch, flag, shown) in &targets {
                let ptx = out.join(format!("{stem}.{shown}.ptx"));
                let o = Command::new(nvcc)
                    .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
                    .arg(format!("-arch={flag}"))
                    .arg("-I")
                    .arg(dir)
                    .arg(&cu)
                    .arg("-o")
                    .arg(&ptx)
                    .output()
                    .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
                if !o.status.success() {
                    panic!(
                        "nvcc failed on {} for {shown}:\n{}{}",
                        cu.display(),
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                let _ = write!(ptx_entries, "({arch}, include_str!({:?})), ", ptx.display().to_string());
                if sass {
                    let cubin = out.join(format!("{stem}.{shown}.cubin"));
                    assemble(nvcc, &ptx, shown, &cubin);
                    let _ = write!(sass_entries, "({arch}, include_bytes!({:?})), ", cubin.display().to_string());
                }
            }
        }
        let _ = writeln!(
            table,
            "    CudaModuleSource {{ name: {stem:?}, source: include_str!({:?}), ptx: &[{ptx_entries}], sass: &[{sass_entries}], only_cc: {specific:?} }},",
            inlined.display().to_string()
        );
    }
    table.push_str("];\n");
    std::fs::write(out.join("cuda_modules.rs"), table).unwrap();
}
