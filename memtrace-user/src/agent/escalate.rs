//! When the agent turns sampled allocator tracing on for a process that was
//! not selected, and when it turns it off again: a pure policy over each
//! process's resident memory over time.
//!
//! A process is escalated when its RSS grows at least [`Policy::slope`]
//! bytes per second over the last [`Policy::window`] (a least-squares fit,
//! so one spike does not do it), or when it grows past [`Policy::rss`]
//! bytes. It backs off once it has grown at less than a quarter of the
//! slope for [`Policy::calm`]; after a back-off the threshold escalates it
//! again only once it has grown a quarter past the RSS it backed off at (a
//! process that stays big but flat is not sampled over and over). At most
//! [`Policy::max_sampled`] processes are escalated at once; the others wait,
//! counted. Not here: reading RSS (the always-on tier's records) or
//! attaching probes (the agent's loop).

use std::collections::HashMap;

/// The escalation settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Growth, bytes per second, that escalates (0: never by slope).
    pub slope: f64,
    /// RSS, bytes, past which a process is escalated (0: never by size).
    pub rss: u64,
    /// Seconds of history the slope is fitted over.
    pub window: f64,
    /// Seconds of calm before a back-off.
    pub calm: f64,
    /// Most processes escalated at once.
    pub max_sampled: usize,
}

/// Why a process was escalated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reason {
    /// RSS grew at this many bytes per second.
    Slope(f64),
    /// RSS reached this many bytes.
    Threshold(u64),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Slope(s) => write!(f, "RSS growing {:.0} KiB/s", s / 1024.0),
            Reason::Threshold(b) => write!(f, "RSS at {} MiB", b >> 20),
        }
    }
}

/// What to do about one process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Start sampling its allocations.
    Escalate(u32, Reason),
    /// Stop: it stopped growing.
    BackOff(u32),
}

#[derive(Clone, Debug, Default)]
struct History {
    /// (seconds, RSS bytes), oldest first, within the window.
    points: Vec<(f64, u64)>,
    escalated: Option<Escalated>,
    /// RSS when it last backed off.
    backed_off_at: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Escalated {
    calm_since: Option<f64>,
}

/// The policy's state for every process it was told about.
#[derive(Debug)]
pub struct Escalator {
    policy: Policy,
    procs: HashMap<u32, History>,
    /// Escalations not made because [`Policy::max_sampled`] were sampled.
    pub deferred: u64,
}

impl Escalator {
    /// A policy with no history.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            procs: HashMap::new(),
            deferred: 0,
        }
    }

    /// Notes process `pid`'s RSS at time `t` (seconds).
    pub fn observe(&mut self, pid: u32, t: f64, rss: u64) {
        let window = self.policy.window;
        let h = self.procs.entry(pid).or_default();
        h.points.push((t, rss));
        let keep_from = h.points.iter().position(|&(pt, _)| pt >= t - window);
        if let Some(i) = keep_from {
            h.points.drain(..i);
        }
    }

    /// Forgets a process that exited.
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// Whether `pid` is escalated now.
    pub fn is_escalated(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_some_and(|h| h.escalated.is_some())
    }

    /// The decisions at time `t`, for the processes observed.
    pub fn decide(&mut self, t: f64) -> Vec<Decision> {
        let policy = self.policy;
        let mut sampled = self
            .procs
            .values()
            .filter(|h| h.escalated.is_some())
            .count();
        let mut out = Vec::new();
        let mut pids: Vec<u32> = self.procs.keys().copied().collect();
        pids.sort_unstable();
        for pid in pids {
            let Some(h) = self.procs.get_mut(&pid) else {
                continue;
            };
            let slope = fitted_slope(&h.points, policy.window / 2.0);
            let rss = h.points.last().map_or(0, |&(_, r)| r);
            match &mut h.escalated {
                Some(e) => {
                    let calm = slope.is_some_and(|s| s < policy.slope / 4.0)
                        || (policy.slope == 0.0 && slope.is_some_and(|s| s <= 0.0));
                    if !calm {
                        e.calm_since = None;
                        continue;
                    }
                    let since = *e.calm_since.get_or_insert(t);
                    if t - since >= policy.calm {
                        h.escalated = None;
                        h.backed_off_at = Some(rss);
                        sampled -= 1;
                        out.push(Decision::BackOff(pid));
                    }
                }
                None => {
                    let by_slope = slope.filter(|&s| policy.slope > 0.0 && s >= policy.slope);
                    let past_threshold = policy.rss > 0
                        && rss >= policy.rss
                        && h.backed_off_at.is_none_or(|b| rss >= b + b / 4);
                    let reason = match (by_slope, past_threshold) {
                        (Some(s), _) => Reason::Slope(s),
                        (None, true) => Reason::Threshold(rss),
                        (None, false) => continue,
                    };
                    if sampled >= policy.max_sampled {
                        self.deferred += 1;
                        continue;
                    }
                    h.escalated = Some(Escalated { calm_since: None });
                    sampled += 1;
                    out.push(Decision::Escalate(pid, reason));
                }
            }
        }
        out
    }
}

/// Least-squares slope of `points`, bytes per second; `None` with fewer
/// than three points or when they span less than `min_span` seconds.
fn fitted_slope(points: &[(f64, u64)], min_span: f64) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let span = points.last()?.0 - points.first()?.0;
    if span < min_span || span <= 0.0 {
        return None;
    }
    let n = points.len() as f64;
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mr = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, r) in points {
        num += (t - mt) * (r as f64 - mr);
        den += (t - mt) * (t - mt);
    }
    (den > 0.0).then(|| num / den)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        slope: 1024.0 * 1024.0,
        rss: 0,
        window: 10.0,
        calm: 6.0,
        max_sampled: 1,
    };

    #[test]
    fn growth_escalates_and_calm_backs_off() {
        let mut e = Escalator::new(POLICY);
        let mut t = 0.0;
        // Flat for 10 s: nothing.
        for _ in 0..10 {
            e.observe(1, t, 100 << 20);
            e.observe(2, t, 50 << 20);
            assert!(e.decide(t).is_empty());
            t += 1.0;
        }
        // Process 1 grows 4 MiB/s.
        let mut rss = 100u64 << 20;
        let mut escalated_at = None;
        for _ in 0..10 {
            rss += 4 << 20;
            e.observe(1, t, rss);
            e.observe(2, t, 50 << 20);
            for d in e.decide(t) {
                match d {
                    Decision::Escalate(1, Reason::Slope(s)) => {
                        assert!(s > 1024.0 * 1024.0);
                        escalated_at.get_or_insert(t);
                    }
                    other => panic!("{other:?}"),
                }
            }
            t += 1.0;
        }
        assert!(escalated_at.is_some());
        assert!(e.is_escalated(1) && !e.is_escalated(2));
        // It stops growing: backs off once the fit is calm for 6 s.
        let mut backed = None;
        for _ in 0..30 {
            e.observe(1, t, rss);
            if e.decide(t).contains(&Decision::BackOff(1)) {
                backed = Some(t);
                break;
            }
            t += 1.0;
        }
        assert!(backed.is_some());
        assert!(!e.is_escalated(1));
    }

    #[test]
    fn threshold_escalates_once_per_growth_and_the_cap_defers() {
        let policy = Policy {
            slope: 0.0,
            rss: 1 << 30,
            ..POLICY
        };
        let mut e = Escalator::new(policy);
        for t in 0..3 {
            e.observe(1, f64::from(t), 2 << 30);
            e.observe(2, f64::from(t), 3 << 30);
        }
        let d = e.decide(3.0);
        assert_eq!(d, vec![Decision::Escalate(1, Reason::Threshold(2 << 30))]);
        assert_eq!(e.deferred, 1);
        // Flat: backs off after the calm time, and is not escalated again
        // while it stays at that size.
        let mut t = 3.0;
        let mut backed = false;
        while t < 30.0 {
            e.observe(1, t, 2 << 30);
            e.observe(2, t, 3 << 30);
            for d in e.decide(t) {
                match d {
                    Decision::BackOff(1) => backed = true,
                    Decision::Escalate(2, _) | Decision::BackOff(2) => {}
                    other => panic!("{other:?} at {t}"),
                }
            }
            t += 1.0;
        }
        assert!(backed);
        assert!(!e.is_escalated(1));
    }

    #[test]
    fn slopes_need_history() {
        assert_eq!(fitted_slope(&[(0.0, 1), (1.0, 2)], 0.5), None);
        let s = fitted_slope(&[(0.0, 0), (1.0, 10), (2.0, 20)], 1.0).unwrap();
        assert!((s - 10.0).abs() < 1e-9);
        assert_eq!(fitted_slope(&[(0.0, 0), (0.1, 10), (0.2, 20)], 1.0), None);
    }
}
