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
