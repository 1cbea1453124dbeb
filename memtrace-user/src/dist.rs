//! Per-stack size and lifetime distributions that cost a few dozen bytes
//! until they need more.
//!
//! A process can have hundreds of thousands of distinct allocation stacks,
//! and most of them allocate one or two sizes. An HdrHistogram costs
//! kilobytes even when empty, so each stack's distribution starts as a few
//! exact (value, count) pairs and becomes a histogram only when a value
//! beyond those shows up. Reports read either through [`Compact::histogram`].
//!
//! This module only stores values; what they mean is the aggregator's.

use std::borrow::Cow;

use hdrhistogram::Histogram;

/// Distinct values kept exactly before switching to a histogram.
const FEW: usize = 3;

/// A distribution of u64 values, held once it needs a histogram at `SIGFIG`
/// significant digits (1 to 5).
#[derive(Clone, Debug)]
pub struct Compact<const SIGFIG: u8>(Repr);

#[derive(Clone, Debug)]
enum Repr {
    /// Up to [`FEW`] distinct values and their counts, `len` of them used
    /// (counts of 32 bits: one that would overflow makes a histogram).
    Few {
        len: u8,
        counts: [u32; FEW],
        vals: [u64; FEW],
    },
    Full(Box<Histogram<u64>>),
}

impl<const SIGFIG: u8> Default for Compact<SIGFIG> {
    fn default() -> Self {
        Self(Repr::Few {
            len: 0,
            counts: [0; FEW],
            vals: [0; FEW],
        })
    }
}

impl<const SIGFIG: u8> Compact<SIGFIG> {
    /// Counts one value.
    pub fn record(&mut self, v: u64) {
        match &mut self.0 {
            Repr::Few { len, counts, vals } => {
                let n = *len as usize;
                match vals[..n].iter().position(|&x| x == v) {
                    Some(i) if counts[i] < u32::MAX => counts[i] += 1,
                    None if n < FEW => {
                        vals[n] = v;
                        counts[n] = 1;
                        *len += 1;
                    }
                    _ => {
                        let mut h = fill(SIGFIG, self.few());
                        // An auto-resizing histogram takes any u64.
                        let _ = h.record(v);
                        self.0 = Repr::Full(Box::new(h));
                    }
                }
            }
            Repr::Full(h) => {
                let _ = h.record(v);
            }
        }
    }

    /// The exact (value, count) pairs while small; empty once a histogram.
    fn few(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (n, counts, vals) = match &self.0 {
            Repr::Few { len, counts, vals } => (*len as usize, &counts[..], &vals[..]),
            Repr::Full(_) => (0, &[][..], &[][..]),
        };
        vals[..n]
            .iter()
            .zip(&counts[..n])
            .map(|(&v, &c)| (v, u64::from(c)))
    }

    /// Values counted.
    pub fn len(&self) -> u64 {
        match &self.0 {
            Repr::Few { .. } => self.few().map(|(_, n)| n).sum(),
            Repr::Full(h) => h.len(),
        }
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The distribution as a histogram (built on the spot while small).
    pub fn histogram(&self) -> Cow<'_, Histogram<u64>> {
        match &self.0 {
            Repr::Few { .. } => Cow::Owned(fill(SIGFIG, self.few())),
            Repr::Full(h) => Cow::Borrowed(h),
        }
    }
}

fn fill(sigfig: u8, vals: impl Iterator<Item = (u64, u64)>) -> Histogram<u64> {
    let mut h = Histogram::new(sigfig).expect("a precision of 1 to 5 digits");
    for (v, n) in vals {
        let _ = h.record_n(v, n);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_values_stay_exact_and_more_become_a_histogram() {
        let mut c = Compact::<2>::default();
        assert!(c.is_empty());
        for v in [64, 64, 128, 4096] {
            c.record(v);
        }
        assert!(matches!(c.0, Repr::Few { len: 3, .. }));
        assert_eq!(c.len(), 4);
        let h = c.histogram();
        assert_eq!((h.len(), h.min(), h.count_at(64)), (4, 64, 2));
        c.record(100_000);
        assert!(matches!(c.0, Repr::Full(_)));
        let h = c.histogram();
        assert_eq!(h.len(), 5);
        assert_eq!(h.count_at(64), 2);
        assert_eq!(h.lowest_equivalent(h.max()), h.lowest_equivalent(100_000));
    }

    #[test]
    fn a_small_distribution_costs_no_more_than_its_inline_values() {
        assert!(size_of::<Compact<2>>() <= 4 + FEW * 12);
    }

    #[test]
    fn a_count_beyond_32_bits_becomes_a_histogram() {
        let mut c = Compact::<2>::default();
        c.record(8);
        if let Repr::Few { counts, .. } = &mut c.0 {
            counts[0] = u32::MAX;
        }
        c.record(8);
        assert!(matches!(c.0, Repr::Full(_)));
        assert_eq!(c.len(), u64::from(u32::MAX) + 1);
    }
}
