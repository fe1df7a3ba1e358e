//! Aim 5: the audit records (audit.rs) against the operations the soak saw the gateway answer
//! (stats.rs), row by row: op, front-end, outcome. What the soak expects a record for: each
//! connection it opened (`connect` ok) and, since every one is closed by the end, a
//! `disconnect`; each request, publish and subscribe that got an answer from the gateway, with
//! the outcome it got (a request lost with its connection, or that the soak stopped waiting
//! for, has no known outcome and is not expected); each policy reload (`policy_reload` ok). Any
//! other record (`invalid`, `auth`, `unsubscribe`, ...) is unexpected, and so is any
//! `audit_lost` count or unreadable line.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::audit::AuditTail;
use crate::stats::Stats;

#[derive(Serialize)]
pub struct AuditReport {
    pub records: u64,
    pub lost: u64,
    pub unreadable_lines: u64,
    pub rotations_followed: u64,
    pub rows: Vec<AuditRow>,
}

#[derive(Serialize)]
pub struct AuditRow {
    pub op: String,
    pub frontend: String,
    pub outcome: String,
    pub expected: u64,
    pub recorded: u64,
}

impl AuditReport {
    pub fn build(tail: &AuditTail, stats: &Stats, reloads: usize) -> AuditReport {
        let mut expected: BTreeMap<(String, String, String), u64> = BTreeMap::new();
        let ops = stats.ops.lock().unwrap_or_else(|p| p.into_inner());
        for ((front, op, outcome), count) in ops.iter() {
            let key = (op.to_string(), front.to_string(), outcome.to_string());
            *expected.entry(key).or_insert(0) += count;
            if *op == "connect" {
                let key = ("disconnect".into(), front.to_string(), "-".into());
                *expected.entry(key).or_insert(0) += count;
            }
        }
        if reloads > 0 {
            let key = ("policy_reload".into(), "-".into(), "ok".into());
            expected.insert(key, reloads as u64);
        }
        let mut keys: Vec<&(String, String, String)> =
            expected.keys().chain(tail.counts.keys()).collect();
        keys.sort();
        keys.dedup();
        let rows = keys
            .into_iter()
            .map(|key| AuditRow {
                op: key.0.clone(),
                frontend: key.1.clone(),
                outcome: key.2.clone(),
                expected: expected.get(key).copied().unwrap_or(0),
                recorded: tail.counts.get(key).copied().unwrap_or(0),
            })
            .collect();
        AuditReport {
            records: tail.records,
            lost: tail.lost,
            unreadable_lines: tail.unreadable_lines,
            rotations_followed: tail.rotations_followed,
            rows,
        }
    }

    /// Every row equal, nothing lost, every line readable, and records at all.
    pub fn matches(&self) -> bool {
        self.records > 0
            && self.lost == 0
            && self.unreadable_lines == 0
            && self.rows.iter().all(|r| r.expected == r.recorded)
    }
}
