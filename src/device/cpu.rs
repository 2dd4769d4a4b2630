//! The CPU runtime: host vectors, rayon for parallel loops, the `gemm` crate for matrix
//! products. Nothing to open; this module only describes the machine.

/// "cpu (N threads)".
pub fn describe() -> String {
    format!("cpu ({} threads)", rayon::current_num_threads())
}

/// Rows per rayon task so that each task touches at least ~32 KiB: smaller tasks cost more in
/// scheduling than they save.
pub fn rows_per_task(row_len: usize) -> usize {
    (8192 / row_len.max(1)).max(1)
}

/// Sets glibc's allocator to keep the memory a training step frees for the next one, for
/// programs that train or run the model on the CPU (the `tuna` binary calls it first thing,
/// before any thread starts; a library does not change its host's allocator on its own). A
/// no-op off glibc.
///
/// glibc maps each large block afresh and hands it back when freed, so every step paid page
/// faults and TLB shootdowns for the same ~2-16 MB activations, gradients and products: a fifth
/// of the full fine-tuning step's cycles were in the kernel (`perf`, `bench-step --full`). Here
/// blocks below 32 MiB come from the heap, the heap's top is trimmed only past 512 MiB, and
/// there are as many arenas as rayon's workers (from `RAYON_NUM_THREADS` or the CPU count)
/// instead of glibc's default of up to 8 per core, whose spare arenas kept memory no thread
/// reused. glibc fixes its arena limit the first time it needs one past 8, hence "before any
/// thread starts". Measured with `tuna bench-step` on the 2-core AVX-512 machine, medians of 8
/// steps, glibc's defaults then these: full fine-tuning 0.346 -> 0.305-0.311 s, peak RSS 1.11
/// -> 1.07 GB, minor page faults 700k -> 340k; the LoRA step 0.193 -> 0.175 s.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Not `rayon::current_num_threads()`: that would start rayon's threads first.
        let workers = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // One arena per worker, the main thread sharing one: with a third arena on two cores
        // the full fine-tuning step was as fast but peaked at 1.32 GB instead of 1.07.
        let arenas = workers.clamp(2, 64) as i32;
        // SAFETY: mallopt only changes the allocator's parameters (a rejected value leaves the
        // default); called from `main` before other threads exist, nothing reads them meanwhile.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
