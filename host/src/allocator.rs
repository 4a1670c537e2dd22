//! Tuning of the system allocator for tensor workloads.
//!
//! Every tensor op allocates its output, and a training step frees and re-allocates buffers of
//! the same few sizes thousands of times. With glibc's defaults, buffers above 128 KiB are
//! mapped fresh from the kernel and unmapped on free, so each one is zero-filled page by page
//! again (a quarter of a training step's time on the benchmark machine). Raising the mapping
//! threshold to its maximum (32 MiB) and never trimming the heap keeps freed buffers for reuse.

/// Applies the tuning; call once at the start of a process, before tensors are allocated.
pub fn tune_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // exist, and an unsupported value is rejected by glibc (returning 0), not undefined.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
