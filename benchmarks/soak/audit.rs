//! The gateway's audit log, read as it grows: every record after the load started is counted
//! by op, front-end and outcome (with the `count` of `audit_lost` notices), following the file
//! across the gateway's own rotations (a renamed file is read to its end through the open
//! handle before the new one is opened), so a two-hour run needs no more disk than the
//! rotation keeps. The report compares the counts with the operations the soak saw answered.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::Deserialize;

/// (op, frontend, outcome); "-" where a record has none.
pub type Key = (String, String, String);

pub struct AuditTail {
    path: PathBuf,
    file: Option<(File, u64)>,
    partial: Vec<u8>,
    pub counts: BTreeMap<Key, u64>,
    /// The sum of the `count` of `audit_lost` records.
    pub lost: u64,
    pub records: u64,
    pub unreadable_lines: u64,
    pub rotations_followed: u64,
}

#[derive(Deserialize)]
struct Line {
    op: String,
    frontend: Option<String>,
    outcome: Option<String>,
    count: Option<u64>,
}

impl AuditTail {
    /// Starts at the file's current end: only what is written from now on counts.
    pub fn from_end(path: PathBuf) -> Result<AuditTail, String> {
        let mut file = File::open(&path).map_err(|err| format!("{}: {err}", path.display()))?;
        let ino = file
            .metadata()
            .map_err(|err| format!("audit: {err}"))?
            .ino();
        file.seek(SeekFrom::End(0))
            .map_err(|err| format!("audit: {err}"))?;
        Ok(AuditTail {
            path,
            file: Some((file, ino)),
            partial: Vec::new(),
            counts: BTreeMap::new(),
            lost: 0,
            records: 0,
            unreadable_lines: 0,
            rotations_followed: 0,
        })
    }

    /// Reads whatever was written since the last call, across a rotation.
    pub fn poll(&mut self) {
        self.read_open();
        let current = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        let open = self.file.as_ref().map(|(_, ino)| *ino);
        if current.is_some() && current != open {
            // Rotated: the renamed file may have had lines added before the switch.
            self.read_open();
            self.partial.clear();
            self.file = File::open(&self.path).ok().zip(current);
            self.rotations_followed += 1;
            self.read_open();
        }
    }

    fn read_open(&mut self) {
        let Some((file, _)) = self.file.as_mut() else {
            return;
        };
        let mut chunk = Vec::new();
        if file.read_to_end(&mut chunk).is_err() {
            return;
        }
        self.partial.extend_from_slice(&chunk);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let whole: Vec<u8> = self.partial.drain(..=end).collect();
        for line in whole.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            self.count(line);
        }
    }

    fn count(&mut self, line: &[u8]) {
        let Ok(record) = serde_json::from_slice::<Line>(line) else {
            self.unreadable_lines += 1;
            return;
        };
        if record.op == "audit_lost" {
            self.lost += record.count.unwrap_or(0);
            return;
        }
        self.records += 1;
        let key = (
            record.op,
            record.frontend.unwrap_or_else(|| "-".into()),
            record.outcome.unwrap_or_else(|| "-".into()),
        );
        *self.counts.entry(key).or_insert(0) += 1;
    }
}
