//! The report: one structure, serialised to `latest.json` and rendered to `latest.md`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::common::RunMeta;
use crate::scenarios::{After, VariantResult};
use crate::settings::Settings;

#[derive(Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub meta: RunMeta,
    pub settings: SettingsOut,
    pub variants: Vec<VariantOut>,
}

#[derive(Serialize)]
pub struct SettingsOut {
    pub connections: usize,
    pub burst_subscribers: usize,
    pub burst_messages: usize,
    pub burst_bytes: usize,
    pub churn_connections: usize,
    pub churn_subscriptions: usize,
    pub after_seconds: f64,
    pub scenarios: Vec<String>,
}

#[derive(Serialize)]
pub struct VariantOut {
    #[serde(flatten)]
    pub result: VariantResult,
    /// Bytes of VmRSS per connection over the baseline, in the `sizes` scenario.
    pub per_connection: Option<PerConnection>,
}

#[derive(Serialize)]
pub struct PerConnection {
    pub idle_bytes: f64,
    pub one_subject_bytes: f64,
    pub own_subject_bytes: f64,
    pub idle_aim_2kib_met: bool,
    pub one_subject_aim_4kib_met: bool,
    pub own_subject_aim_6kib_met: bool,
}

impl Report {
    pub fn build(meta: RunMeta, s: &Settings, variants: Vec<VariantResult>) -> Report {
        let variants = variants
            .into_iter()
            .map(|result| {
                let per_connection = result.sizes.as_ref().map(|z| {
                    let per = |kib: u64, base: u64| {
                        (kib as f64 - base as f64) * 1024.0 / z.connections as f64
                    };
                    let idle = per(z.idle_kib, z.baseline_kib);
                    let one = per(z.one_subject_kib, z.baseline_kib);
                    let own = per(z.own_subject_kib, z.own_baseline_kib);
                    PerConnection {
                        idle_bytes: idle.round(),
                        one_subject_bytes: one.round(),
                        own_subject_bytes: own.round(),
                        idle_aim_2kib_met: idle <= 2048.0,
                        one_subject_aim_4kib_met: one <= 4096.0,
                        own_subject_aim_6kib_met: own <= 6144.0,
                    }
                });
                VariantOut {
                    result,
                    per_connection,
                }
            })
            .collect();
        Report {
            meta,
            settings: SettingsOut {
                connections: s.connections,
                burst_subscribers: s.burst_subscribers,
                burst_messages: s.burst_messages,
                burst_bytes: s.burst_bytes,
                churn_connections: s.churn_connections,
                churn_subscriptions: s.churn_subscriptions,
                after_seconds: s.after.as_secs_f64(),
                scenarios: s.scenarios.clone(),
            },
            variants,
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn opt_mib(kib: Option<u64>) -> String {
    kib.map_or("—".into(), mib)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

pub fn markdown(r: &Report) -> String {
    let m = &r.meta;
    let s = &r.settings;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# ipc-gateway benchmark: memory per connection and after bursts\n"
    );
    let _ = writeln!(md, "{}", m.md_command());
    let _ = writeln!(
        md,
        "- Date: {} (start; the run took {:.0} s)",
        m.date, m.wall_seconds
    );
    let _ = writeln!(
        md,
        "{}",
        m.md_machine("other work shared the machine (memory numbers do not depend on it)")
    );
    let _ = writeln!(
        md,
        "- nats-server: {}; source when the run started: git {}{}",
        m.nats_server_version,
        m.git_at_start.commit,
        m.md_uncommitted()
    );
    let _ = writeln!(
        md,
        "- Scenarios ({}), each against a fresh gateway: `sizes` = {} WebSocket connections idle, then each subscribed to one subject (the same for all), and on a second gateway each subscribed to a subject of its own; `burst` = {} subscribers of one subject get {} messages of {} B published at once; `churn` = {} connections open {} subscriptions on distinct subjects, then close them. RSS sampled every second for {:.0} s after.",
        s.scenarios.join(", "),
        s.connections,
        s.burst_subscribers,
        s.burst_messages,
        s.burst_bytes,
        s.churn_connections,
        s.churn_subscriptions,
        s.after_seconds
    );
    let _ = writeln!(md, "\n## Variants\n");
    let _ = writeln!(md, "| variant | binary | environment | extra flags |");
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    for v in &r.variants {
        let var = &v.result.variant;
        let env: Vec<String> = var.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} |",
            var.name,
            var.binary.display(),
            if env.is_empty() {
                "—".into()
            } else {
                format!("`{}`", env.join(" "))
            },
            if var.args.is_empty() {
                "—".into()
            } else {
                format!("`{}`", var.args.join(" "))
            },
        );
    }

    if r.variants.iter().any(|v| v.per_connection.is_some()) {
        let _ = writeln!(
            md,
            "\n## RSS per connection at {} connections (stage − baseline) / N\n",
            s.connections
        );
        let _ = writeln!(
            md,
            "| variant | baseline MiB | idle | one subject (all the same) | own subject each | aims ≤ 2 / 4 / 6 KiB |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | --- |");
        for v in &r.variants {
            let (Some(p), Some(z)) = (&v.per_connection, &v.result.sizes) else {
                continue;
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} B | {:.0} B | {:.0} B | {} / {} / {} |",
                v.result.variant.name,
                mib(z.baseline_kib),
                p.idle_bytes,
                p.one_subject_bytes,
                p.own_subject_bytes,
                met(p.idle_aim_2kib_met),
                met(p.one_subject_aim_4kib_met),
                met(p.own_subject_aim_6kib_met)
            );
        }
    }

    for (title, pick) in [
        (
            format!(
                "After a burst: {} messages of {} B to {} subscribers of one subject",
                s.burst_messages, s.burst_bytes, s.burst_subscribers
            ),
            (|v: &VariantOut| v.result.burst.as_ref()) as fn(&VariantOut) -> Option<&After>,
        ),
        (
            format!(
                "After churn: {} subscriptions on distinct subjects opened and closed by {} connections",
                s.churn_subscriptions, s.churn_connections
            ),
            |v: &VariantOut| v.result.churn.as_ref(),
        ),
    ] {
        if !r.variants.iter().any(|v| pick(v).is_some()) {
            continue;
        }
        let _ = writeln!(md, "\n## {title}\n");
        let _ = writeln!(
            md,
            "VmRSS in MiB. \"before\" is the gateway just before (connections open{}); the aim is RSS at +{:.0} s ≤ 2 × before + 20 MB.\n",
            if title.starts_with("After a burst") {
                ", subscribed, idle"
            } else {
                ", idle"
            },
            s.after_seconds
        );
        let _ = writeln!(
            md,
            "| variant | baseline | before | peak | event s | +1 s | +10 s | +30 s | +{:.0} s | aim | |",
            s.after_seconds
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for v in &r.variants {
            let Some(a) = pick(v) else { continue };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
                v.result.variant.name,
                mib(a.baseline_kib),
                mib(a.before_kib),
                mib(a.peak_kib),
                a.event_seconds,
                opt_mib(a.at(1.0)),
                opt_mib(a.at(10.0)),
                opt_mib(a.at(30.0)),
                mib(a.end_kib),
                mib(a.aim_kib),
                met(a.aim_met)
            );
        }
        let notes: Vec<String> = r
            .variants
            .iter()
            .filter_map(|v| {
                pick(v).map(|a| {
                    format!(
                        "{}: {} ok, {} failed, {} messages, {} dropped",
                        v.result.variant.name,
                        a.event.ok,
                        a.event.failed,
                        a.event.msgs,
                        a.event.dropped
                    )
                })
            })
            .collect();
        let _ = writeln!(md, "\nDelivered: {}.", notes.join("; "));
    }

    let errors: Vec<String> = r
        .variants
        .iter()
        .flat_map(|v| {
            v.result
                .errors
                .iter()
                .map(move |e| format!("- {}: {e}", v.result.variant.name))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "\n## Errors\n\n{}", errors.join("\n"));
    }
    let _ = writeln!(
        md,
        "\nRSS is the gateway's VmRSS (/proc/PID/status); kernel socket buffers are not in it. The per-sample series are in latest.json."
    );
    md
}
