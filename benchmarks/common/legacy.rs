//! Stand-ins for helpers the soak and ws_idle benchmarks still call while they move to
//! `RunMeta` (meta.rs); removed once they have.

use std::path::Path;

use super::meta::RunMeta;
use super::procfs::command_output;

/// CPU count, CPU model and kernel release.
pub fn machine_meta() -> (usize, String, String) {
    let m = RunMeta::machine_now();
    (m.nproc, m.cpu_model, m.kernel)
}

pub fn recorded_command(command_var: &str, knobs: &[&str], fallback: &str) -> String {
    RunMeta::recorded_command(command_var, knobs, fallback)
}

pub fn utc_now() -> String {
    command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into())
}

pub fn git_state(manifest: &Path, short: bool) -> (String, Vec<String>) {
    let state = RunMeta::git_state(manifest, short);
    (state.commit, state.uncommitted)
}

pub fn built_at(bin: &Path) -> String {
    RunMeta::built_at(bin)
}
