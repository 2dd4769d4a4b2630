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

/// Runs `f` on one of rayon's worker threads (the current pool's, or the global pool's when
/// called from outside any), carrying [`with_gemm_threads`]'s limit; on a worker already, runs
/// it in place. For a sequence of ops, such as a forward pass: a parallel loop started from
/// outside the pool hands its work to the workers, wakes them and sleeps until they are done,
/// which costs tens of µs of waking per loop; started on a worker, it queues the work where
/// the worker itself takes part and the others steal. Decoding starts ~230 parallel loops a
/// token: one hop per forward instead of one per loop took greedy decoding of the SmolLM-135M
/// shape from 51 to 65 tokens/s (the 2-core AVX-512 machine, `tuna generate`, 2 threads).
///
/// [`with_gemm_threads`]: crate::kernels::matmul::cpu::with_gemm_threads
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use crate::kernels::matmul::cpu::{gemm_threads, with_gemm_threads};
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let threads = gemm_threads();
    rayon::scope(|_| with_gemm_threads(threads, f))
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

#[cfg(test)]
mod tests {
    use super::on_pool;
    use crate::kernels::matmul::cpu::{gemm_threads, with_gemm_threads};

    #[test]
    fn on_pool_moves_work_onto_a_worker_and_keeps_the_gemm_limit() {
        std::thread::spawn(|| {
            assert_eq!(rayon::current_thread_index(), None, "a plain thread is no worker");
            let (worker, limit) = with_gemm_threads(3, || on_pool(|| (rayon::current_thread_index(), gemm_threads())));
            assert!(worker.is_some(), "on_pool ran its work off the pool");
            assert_eq!(limit, 3, "the caller's with_gemm_threads limit was lost on the worker");
            assert_eq!(gemm_threads(), 0, "the limit outlived with_gemm_threads");
            // On a worker already: in place, on the same thread.
            let (outer, inner) = on_pool(|| (rayon::current_thread_index(), on_pool(rayon::current_thread_index)));
            assert_eq!(outer, inner);
        })
        .join()
        .unwrap();
    }
}
