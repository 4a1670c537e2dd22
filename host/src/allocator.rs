//! The allocator: mimalloc (set as the global allocator by the binaries), tuned for tensor
//! workloads.
//!
//! Every tensor op allocates its output, and a training step frees and re-allocates buffers
//! of the same few sizes thousands of times. By default mimalloc returns freed memory to the
//! kernel after a short delay, so the next buffer of that size comes back as fresh pages that
//! the kernel zero-fills page by page (a third of a training step's time on the benchmark
//! machine). Commands that run a model keep freed memory for reuse instead.

/// `mi_option_purge_delay` in the option enum of the pinned mimalloc (libmimalloc-sys 0.1.49,
/// mimalloc v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never returns freed memory to the kernel; call once at the start of a process that runs a
/// model.
pub fn tune_for_tensors() {
    // SAFETY: setting a mimalloc option is a plain store into its option table; -1 is the
    // documented value for "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Whether tensor tuning is in effect (the purge delay reads back as -1).
pub fn tuned_for_tensors() -> bool {
    // SAFETY: reading a mimalloc option has no side effect but initializing it.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == -1 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        super::tune_for_tensors();
        assert!(super::tuned_for_tensors());
    }
}
