//! The signal-to-noise ratio of a weight matrix, as Spectrum defines it: its singular values
//! split at the Marchenko–Pastur threshold of a random matrix of the same shape.
//!
//! The noise scale is estimated from the spread of the singular values themselves,
//! `σ̂ = IQR / 1.349` (the interquartile range of a normal distribution is 1.349 σ), and the
//! threshold is `τ = σ̂ · (1 + √β)` with `β` the ratio of the shorter side to the longer.
//! Singular values above `τ` are signal, the rest noise, and the ratio is normalized by the
//! largest singular value: `SNR = (Σ signal / Σ noise) / σ_max`, infinite when nothing is
//! noise (a vector, which has one singular value).

/// The singular values of a `rows × cols` row-major matrix, largest first. A vector (`rows`
/// or `cols` is 1, or a 1-D weight) has one: its norm.
pub fn singular_values(rows: usize, cols: usize, values: &[f32]) -> Vec<f64> {
    if rows == 1 || cols == 1 {
        let norm = values
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        return vec![norm];
    }
    let matrix = faer::Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(values[i * cols + j]));
    let mut singular: Vec<f64> = match matrix.singular_values() {
        Ok(s) => s,
        // The iteration did not converge: fall back on the eigenvalues of the Gram matrix.
        Err(_) => {
            let gram = if rows <= cols {
                &matrix * matrix.transpose()
            } else {
                matrix.transpose() * &matrix
            };
            gram.self_adjoint_eigenvalues(faer::Side::Lower)
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.max(0.0).sqrt())
                .collect()
        }
    };
    singular.sort_by(|a, b| b.total_cmp(a));
    singular
}

/// The `q` quantile of ascending `sorted`, interpolating linearly between neighbours (as
/// `torch.quantile` and `numpy.quantile` do by default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    sorted[below] + (position - below as f64) * (sorted[above] - sorted[below])
}

/// Spectrum's SNR of a matrix with these singular values (any order) and shape.
pub fn snr(singular: &[f64], rows: usize, cols: usize) -> f64 {
    let Some(&largest) = singular.iter().max_by(|a, b| a.total_cmp(b)) else {
        return f64::INFINITY;
    };
    let mut ascending = singular.to_vec();
    ascending.sort_by(f64::total_cmp);
    let sigma = (quantile(&ascending, 0.75) - quantile(&ascending, 0.25)) / 1.349;
    let (short, long) = (rows.min(cols).max(1), rows.max(cols).max(1));
    let beta = short as f64 / long as f64;
    let threshold = sigma * (1.0 + beta.sqrt());
    let signal: f64 = singular.iter().filter(|&&s| s > threshold).sum();
    let noise: f64 = singular.iter().filter(|&&s| s <= threshold).sum();
    if noise == 0.0 {
        return f64::INFINITY;
    }
    signal / noise / largest
}

/// The SNR of a weight of `shape` (2-D, or 1-D as a column).
pub fn weight_snr(shape: &[usize], values: &[f32]) -> f64 {
    let (rows, cols) = match shape {
        [rows, cols] => (*rows, *cols),
        _ => (values.len(), 1),
    };
    snr(&singular_values(rows, cols, values), rows, cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `I − 2vvᵀ/|v|²`, an orthogonal reflection of size `n`.
    fn reflection(n: usize, seed: u64) -> faer::Mat<f64> {
        let v: Vec<f64> = (0..n)
            .map(|i| ((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        let norm2: f64 = v.iter().map(|x| x * x).sum();
        faer::Mat::from_fn(n, n, |i, j| {
            f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / norm2
        })
    }

    /// A `rows × cols` matrix `U·diag(s)·Vᵀ` with orthogonal U and V.
    fn with_spectrum(rows: usize, cols: usize, s: &[f64]) -> Vec<f32> {
        let diagonal = faer::Mat::from_fn(rows, cols, |i, j| if i == j { s[i] } else { 0.0 });
        let u = reflection(rows, 1) * reflection(rows, 2);
        let v = reflection(cols, 3) * reflection(cols, 4);
        let m = u * diagonal * v.transpose();
        (0..rows)
            .flat_map(|i| (0..cols).map(move |j| (i, j)))
            .map(|(i, j)| m[(i, j)] as f32)
            .collect()
    }

    #[test]
    fn the_snr_of_a_known_spectrum() {
        // Singular values 8, 4, 2, 1 of a 4 × 8 matrix: quartiles 1.75 and 5, σ̂ = 3.25/1.349,
        // τ = σ̂·(1 + √0.5) ≈ 4.11, so 8 is signal and 4 + 2 + 1 noise: SNR = (8/7)/8 = 1/7.
        let values = with_spectrum(4, 8, &[8.0, 4.0, 2.0, 1.0]);
        let singular = singular_values(4, 8, &values);
        for (got, want) in singular.iter().zip([8.0, 4.0, 2.0, 1.0]) {
            assert!((got - want).abs() < 1e-5, "{singular:?}");
        }
        let got = weight_snr(&[4, 8], &values);
        assert!((got - 1.0 / 7.0).abs() < 1e-6, "{got}");
        // The same matrix transposed has the same spectrum and β.
        let transposed: Vec<f32> = (0..8)
            .flat_map(|j| (0..4).map(move |i| (i, j)))
            .map(|(i, j)| values[i * 8 + j])
            .collect();
        assert!((weight_snr(&[8, 4], &transposed) - 1.0 / 7.0).abs() < 1e-6);
    }

    #[test]
    fn a_square_spectrum_moves_the_threshold_with_beta() {
        // 6 × 6, singular values 10, 3, 2, 2, 1, 1: quartiles 1.25 and 2.75, σ̂ = 1.5/1.349,
        // τ = 2σ̂ ≈ 2.22 (β = 1): signal 10 + 3, noise 6, SNR = (13/6)/10.
        let values = with_spectrum(6, 6, &[10.0, 3.0, 2.0, 2.0, 1.0, 1.0]);
        let got = weight_snr(&[6, 6], &values);
        assert!((got - 13.0 / 60.0).abs() < 1e-6, "{got}");
    }

    #[test]
    fn vectors_and_pure_signal_are_infinite() {
        assert_eq!(weight_snr(&[4], &[1.0, 2.0, 3.0, 4.0]), f64::INFINITY);
        assert_eq!(snr(&[], 0, 0), f64::INFINITY);
        assert!((quantile(&[1.0, 2.0, 4.0, 8.0], 0.75) - 5.0).abs() < 1e-12);
    }
}
