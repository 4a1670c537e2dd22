//! How the tensor code shares the cores.
//!
//! candle runs elementwise ops on its own thread pool, whose workers spin 25,000 times after
//! each op before they sleep; matrix products and axl's kernels run on rayon's pool. On a
//! machine whose cores run both pools, that spinning took 11 % of the CPU time of a training
//! step (perf on `axl-bench-model train --shape tiny --mode full`, 2 cores), time the GEMMs
//! then lacked. axl has candle's workers sleep as soon as they are idle.

/// Makes candle's idle workers sleep at once, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` says
/// otherwise. Call at the start of a process, before any tensor op.
pub fn no_idle_spinning() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}
