//! The arithmetic of byte-weighted Poisson sampling, shared by the loader
//! (which fills the kernel side's table of draws) and the estimates.
//!
//! With a mean interval of `T` bytes, an allocation of `s` bytes is sampled
//! with probability `p(s) = 1 - exp(-s / T)`. Counting each sample as
//! `1 / p(s)` allocations of `s / p(s)` bytes makes every total an unbiased
//! estimate: its expected value is the true total, whatever the sizes (the
//! Horvitz-Thompson estimator; jemalloc's and Go's heap profiles weigh their
//! samples the same way).

/// The probability that an allocation of `size` bytes is sampled with mean
/// interval `mean` bytes.
pub fn probability(size: u64, mean: u64) -> f64 {
    if mean <= 1 {
        return 1.0;
    }
    // exp_m1 keeps precision for sizes far below the interval.
    -(-(size as f64) / mean as f64).exp_m1()
}

/// How many allocations, and how many bytes, one sample of `size` bytes
/// stands for, kept with thinning shift `shift` (its sample point was kept
/// with probability `2^-shift`, so it was sampled with `p(s) / 2^shift`).
pub fn weights(size: u64, mean: u64, shift: u32) -> (f64, f64) {
    let p = kept(size, mean, shift);
    (1.0 / p, size as f64 / p)
}

/// What one sample adds to the variance of the totals it is counted in,
/// of allocations and of bytes: `(1 - p) / p^2 * x^2`, summed over samples,
/// is an unbiased estimate of an estimated total's variance
/// (Horvitz-Thompson's, for draws made independently of each other).
pub fn variances(size: u64, mean: u64, shift: u32) -> (f64, f64) {
    let p = kept(size, mean, shift);
    let v = (1.0 - p) / (p * p);
    (v, v * (size as f64) * (size as f64))
}

/// The probability that an allocation of `size` bytes became a sample kept
/// with thinning shift `shift`.
fn kept(size: u64, mean: u64, shift: u32) -> f64 {
    probability(size.max(1), mean) * thinning(size, mean, shift)
}

/// The probability that the kernel side keeps a sample point that fell in
/// an allocation of `size` bytes, under thinning shift `shift`:
/// `min(2^shift, 1 + size / mean) / 2^shift` (integer division, as there),
/// so an allocation many intervals large is thinned less or not at all.
pub fn thinning(size: u64, mean: u64, shift: u32) -> f64 {
    let shift = shift.min(62);
    let odds = (1 + size / mean.max(1)).min(1 << shift);
    odds as f64 / (1u64 << shift) as f64
}

/// `n` draws of the distance in bytes to the next sample point (exponential
/// with mean `mean`), at evenly spaced quantiles, scaled so that their mean
/// is `mean` exactly. The kernel side picks one at random after each
/// sample; quantiles instead of random draws make the table's mean and
/// shape exact, whatever `n`.
pub fn exponential_draws(mean: u64, n: u32) -> Vec<u64> {
    let n = n.max(1);
    let raw: Vec<f64> = (0..n)
        .map(|i| -(1.0 - (f64::from(i) + 0.5) / f64::from(n)).ln())
        .collect();
    let sum: f64 = raw.iter().sum();
    let scale = mean as f64 * f64::from(n) / sum;
    raw.iter()
        .map(|r| ((r * scale).round() as u64).max(1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_allocations_weigh_about_the_interval() {
        let (count, bytes) = weights(64, 512 * 1024, 0);
        assert!((count - 8192.5).abs() < 1.0, "{count}");
        assert!((bytes - 524_320.0).abs() < 64.0, "{bytes}");
    }

    #[test]
    fn large_allocations_weigh_themselves() {
        let (count, bytes) = weights(64 << 20, 512 * 1024, 0);
        assert_eq!(count, 1.0);
        assert_eq!(bytes, (64u64 << 20) as f64);
        // Exact mode: every call is a sample.
        assert_eq!(weights(100, 1, 0), (1.0, 100.0));
    }

    #[test]
    fn draws_have_the_mean_and_an_exponential_shape() {
        let mean = 512 * 1024;
        let d = exponential_draws(mean, 4096);
        let avg = d.iter().sum::<u64>() as f64 / d.len() as f64;
        assert!((avg - mean as f64).abs() < 2.0, "{avg}");
        // An exponential's median is mean * ln 2.
        let mut sorted = d.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2] as f64;
        assert!((median / mean as f64 - std::f64::consts::LN_2).abs() < 0.01);
        assert!(d.iter().all(|&x| x >= 1));
    }

    /// The estimator is unbiased: simulate the kernel side's countdown with
    /// the table over a stream of mixed sizes and compare the estimates to
    /// the truth.
    #[test]
    fn simulated_sampling_estimates_totals() {
        let mean = 64 * 1024;
        let draws = exponential_draws(mean, 4096);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut left: i64 = draws[7] as i64;
        let sizes = [512u64, 4096, 70_000, 1 << 20];
        let mut truth = [0u64; 4];
        let mut est = [0f64; 4];
        for _ in 0..2_000_000 {
            let k = (next() % 4) as usize;
            let s = sizes[k];
            truth[k] += s;
            left -= s as i64;
            if left <= 0 {
                left = draws[(next() % 4096) as usize] as i64;
                est[k] += weights(s, mean, 0).1;
            }
        }
        for k in 0..4 {
            let err = (est[k] - truth[k] as f64).abs() / truth[k] as f64;
            assert!(err < 0.05, "size {}: {err}", sizes[k]);
        }
    }

    /// Thinning with a known shift keeps the totals unbiased, and the
    /// variance estimate matches the spread of the estimates over runs.
    #[test]
    fn thinned_samples_weigh_for_the_thinned_and_state_their_error() {
        let mean = 4096;
        let draws = exponential_draws(mean, 4096);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let sizes = [16u64, 200, 3000, 50_000];
        let runs = 200;
        let mut errors = Vec::new();
        let mut variances_stated = Vec::new();
        for _ in 0..runs {
            let mut left: i64 = draws[(next() % 4096) as usize] as i64;
            let (mut est, mut var) = (0.0, 0.0);
            let mut truth = 0u64;
            for i in 0..20_000u64 {
                let s = sizes[(next() % 4) as usize];
                truth += s;
                left -= s as i64;
                if left > 0 {
                    continue;
                }
                left = draws[(next() % 4096) as usize] as i64;
                // The shift changes over the run, as a budget's does; the
                // kernel side's coin.
                let shift = (i / 5000) as u32;
                if (next() & ((1 << shift) - 1)) > s / mean {
                    continue;
                }
                est += weights(s, mean, shift).1;
                var += variances(s, mean, shift).1;
            }
            errors.push(est - truth as f64);
            variances_stated.push(var);
        }
        let n = runs as f64;
        let bias = errors.iter().sum::<f64>() / n;
        let spread = errors.iter().map(|e| (e - bias).powi(2)).sum::<f64>() / (n - 1.0);
        let stated = variances_stated.iter().sum::<f64>() / n;
        // The mean error of 200 runs is within 4 of its standard errors.
        assert!(
            bias.abs() < 4.0 * (spread / n).sqrt(),
            "mean error {bias}, spread {spread}"
        );
        assert!(
            (stated / spread - 1.0).abs() < 0.3,
            "stated variance {stated}, observed {spread}"
        );
    }
}
