//! The samples as a CSV series (`<name>-series.csv` next to the report): one line per sample,
//! the columns a plot of the run needs.

use std::fmt::Write as _;

use crate::samples::Sample;

const HEADER: &str = "t_s,phase,rss_kib,fds,threads,connections,inflight_requests,nats_connected,req_per_s,req_per_s_uds,req_per_s_ws,req_per_s_grpc,errors,avg_latency_ms,sub_msgs_uds,sub_msgs_ws,sub_msgs_grpc,sub_missing,dropped,audit_records,gateway_cpu_pct,nats_server_cpu_pct";

pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from(HEADER);
    out.push('\n');
    let opt = |v: Option<f64>, digits: usize| v.map_or(String::new(), |v| format!("{v:.digits$}"));
    for s in samples {
        let _ = writeln!(
            out,
            "{:.1},{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{},{},{},{:.1},{}",
            s.t,
            s.phase,
            s.rss_kb,
            s.fds,
            s.threads,
            opt(s.connections, 0),
            opt(s.inflight, 0),
            opt(s.nats_connected, 0),
            s.req_per_s,
            s.req_per_s_by_front[0],
            s.req_per_s_by_front[1],
            s.req_per_s_by_front[2],
            s.errors,
            opt(s.avg_latency_ms, 3),
            s.feed_messages[0],
            s.feed_messages[1],
            s.feed_messages[2],
            s.sub_missing,
            s.dropped,
            s.audit_records,
            s.gw_cpu_pct,
            opt(s.nats_cpu_pct, 1),
        );
    }
    out
}
