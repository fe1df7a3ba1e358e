//! A latency histogram in µs that client processes fill and the parent merges: exact below
//! 64 µs, then 32 buckets per power of two (each at most about 3 % wide). It travels between
//! processes as text, `index:count` pairs joined by commas (`-` when empty).

const LINEAR: u64 = 64;
const SUB_BITS: u32 = 5;
const SUBS: u64 = 1 << SUB_BITS;
/// Values are capped here (about 12 days in µs).
const CAP: u64 = 1 << 40;

#[derive(Debug, Clone, Default)]
pub struct Hist {
    counts: Vec<u64>,
}

fn index(value: u64) -> usize {
    let v = value.min(CAP);
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros() as u64; // ≥ 6
    let sub = (v >> (exp - SUB_BITS as u64)) & (SUBS - 1);
    (LINEAR + (exp - 6) * SUBS + sub) as usize
}

/// The lowest value of a bucket and its width.
fn bounds(index: usize) -> (u64, u64) {
    let i = index as u64;
    if i < LINEAR {
        return (i, 1);
    }
    let exp = 6 + (i - LINEAR) / SUBS;
    let sub = (i - LINEAR) % SUBS;
    let shift = exp - SUB_BITS as u64;
    ((SUBS + sub) << shift, 1 << shift)
}

impl Hist {
    pub fn record(&mut self, value: u64) {
        let i = index(value);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
    }

    pub fn clear(&mut self) {
        self.counts.clear();
    }

    pub fn merge(&mut self, other: &Hist) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value at quantile `q` (0..=1): the middle of its bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, width) = bounds(i);
                return Some(low as f64 + (width as f64 - 1.0) / 2.0);
            }
        }
        None
    }

    /// The top of the highest bucket that holds a value.
    pub fn max(&self) -> Option<f64> {
        let i = self.counts.iter().rposition(|&n| n > 0)?;
        let (low, width) = bounds(i);
        Some((low + width - 1) as f64)
    }

    pub fn encode(&self) -> String {
        let pairs: Vec<String> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| format!("{i}:{n}"))
            .collect();
        if pairs.is_empty() {
            "-".into()
        } else {
            pairs.join(",")
        }
    }

    pub fn decode(text: &str) -> Hist {
        let mut hist = Hist::default();
        for pair in text.split(',') {
            if let Some((i, n)) = pair.split_once(':')
                && let (Ok(i), Ok(n)) = (i.parse::<usize>(), n.parse::<u64>())
                && i <= index(CAP)
            {
                if hist.counts.len() <= i {
                    hist.counts.resize(i + 1, 0);
                }
                hist.counts[i] += n;
            }
        }
        hist
    }
}
