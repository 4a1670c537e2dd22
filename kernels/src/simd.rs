//! Running elementwise loops on the widest vector instructions the CPU has.
//!
//! axl is built for baseline x86-64 (SSE2), so that one binary runs on any x86-64 CPU; loops
//! compiled for that baseline use 4-lane vectors without fused multiply-add. [`vectorized!`]
//! runs a block in code compiled for AVX-512 (x86-64-v4) or AVX2 with FMA (x86-64-v3) when the
//! CPU has them, chosen at run time.
//!
//! [`vectorized!`]: crate::vectorized

/// Runs a block compiled for the widest of x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3 (AVX2,
/// FMA) and the baseline that this CPU supports, and evaluates to its value.
///
/// The block is expanded once per level, each copy inside a function compiled for that level
/// (and instantiated in the caller's codegen unit), so that it and what it calls inline there
/// and its loops get that level's vectors. Closures
/// it hands to other threads (rayon tasks) are not inlined, so it belongs inside each task.
/// The results are the same bits at every level (Rust neither fuses multiply-adds nor reorders
/// sums on its own); only the speed differs.
#[macro_export]
macro_rules! vectorized {
    ($body:block) => {
        match $crate::simd::level() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has every feature `v4` is compiled for.
            $crate::simd::Level::V4 => unsafe { $crate::simd::v4(|| $body) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has every feature `v3` is compiled for.
            $crate::simd::Level::V3 => unsafe { $crate::simd::v3(|| $body) },
            _ => $body,
        }
    };
}

/// The instruction set levels [`vectorized!`](crate::vectorized) chooses between.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Baseline x86-64, or another architecture.
    Baseline,
    /// x86-64-v3: AVX2, FMA, BMI1/2, LZCNT.
    V3,
    /// x86-64-v4: v3 plus AVX-512 F/BW/DQ/VL.
    V4,
}

/// The widest level this CPU supports (detected once).
#[doc(hidden)]
#[inline]
pub fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        const LEVELS: [Level; 3] = [Level::Baseline, Level::V3, Level::V4];
        // 0: not yet detected; otherwise the index in LEVELS plus one.
        static DETECTED: AtomicU8 = AtomicU8::new(0);
        match DETECTED.load(Ordering::Relaxed) {
            0 => {
                let level = detect();
                let index = LEVELS.iter().position(|&l| l == level).unwrap_or(0);
                DETECTED.store(index as u8 + 1, Ordering::Relaxed);
                level
            }
            stored => LEVELS[usize::from(stored - 1).min(2)],
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Baseline
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    let v3 = std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("bmi1")
        && std::is_x86_feature_detected!("bmi2")
        && std::is_x86_feature_detected!("lzcnt");
    let v4 = v3
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl");
    if v4 {
        Level::V4
    } else if v3 {
        Level::V3
    } else {
        Level::Baseline
    }
}

/// Calls `f`, compiled for x86-64-v4.
///
/// # Safety
/// The CPU must support x86-64-v4 ([`level`] is [`Level::V4`]).
#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt")]
#[inline]
pub unsafe fn v4<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Calls `f`, compiled for x86-64-v3.
///
/// # Safety
/// The CPU must support x86-64-v3 ([`level`] is [`Level::V3`] or [`Level::V4`]).
#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt")]
#[inline]
pub unsafe fn v3<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    /// An AdamW-like update and an exponential: divisions, square roots and the polynomial
    /// `exp`, whose vector forms must round exactly like the scalar ones.
    fn kernel(values: &mut [f32]) -> f32 {
        for v in values.iter_mut() {
            let m = 0.9 * *v + 0.1 * 0.25;
            *v = crate::cpu::exp(*v * 0.5) - 1e-3 * m / ((*v * *v).sqrt() + 1e-8);
        }
        crate::cpu::lane_sum(values)
    }

    #[test]
    fn vectorized_code_gives_the_same_bits_as_baseline_code() {
        let input: Vec<f32> = (0..1037)
            .map(|i| ((i * 7919 % 2003) as f32 - 1000.0) / 97.0)
            .collect();
        let (mut plain, mut wide) = (input.clone(), input);
        let plain_sum = kernel(&mut plain);
        let wide_sum = crate::vectorized!({ kernel(&mut wide) });
        assert_eq!(plain_sum.to_bits(), wide_sum.to_bits());
        assert!(plain
            .iter()
            .zip(&wide)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
