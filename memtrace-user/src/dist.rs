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
    /// Up to [`FEW`] distinct values and their counts, `len` of them used.
    Few {
        len: u8,
        vals: [(u64, u64); FEW],
    },
    Full(Box<Histogram<u64>>),
}

impl<const SIGFIG: u8> Default for Compact<SIGFIG> {
    fn default() -> Self {
        Self(Repr::Few {
            len: 0,
            vals: [(0, 0); FEW],
        })
    }
}

impl<const SIGFIG: u8> Compact<SIGFIG> {
    /// Counts one value.
    pub fn record(&mut self, v: u64) {
        match &mut self.0 {
            Repr::Few { len, vals } => {
                let used = &mut vals[..*len as usize];
                if let Some(slot) = used.iter_mut().find(|(x, _)| *x == v) {
                    slot.1 += 1;
                } else if (*len as usize) < FEW {
                    vals[*len as usize] = (v, 1);
                    *len += 1;
                } else {
                    let mut h = fill(SIGFIG, &vals[..]);
                    // An auto-resizing histogram takes any u64.
                    let _ = h.record(v);
                    self.0 = Repr::Full(Box::new(h));
                }
            }
            Repr::Full(h) => {
                let _ = h.record(v);
            }
        }
    }

    /// Values counted.
    pub fn len(&self) -> u64 {
        match &self.0 {
            Repr::Few { len, vals } => vals[..*len as usize].iter().map(|(_, n)| n).sum(),
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
            Repr::Few { len, vals } => Cow::Owned(fill(SIGFIG, &vals[..*len as usize])),
            Repr::Full(h) => Cow::Borrowed(h),
        }
    }
}

fn fill(sigfig: u8, vals: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = Histogram::new(sigfig).expect("a precision of 1 to 5 digits");
    for &(v, n) in vals {
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
        assert!(size_of::<Compact<2>>() <= 8 + FEW * 16);
    }
}
