//! `/status` as a small HTML page for a person: the same report as the JSON, every value
//! escaped, no script, the page's own stylesheet, and a Content-Security-Policy that allows
//! nothing else. It reloads itself every 5 s.

use std::fmt::Write;

use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};

use crate::core::status::StatusReport;

/// Only this origin's stylesheet: no script, no framing, no forms.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `text` with the five characters that mean something in HTML escaped (safe in element
/// content and in quoted attribute values).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page for `report`; `granted`: the caller may see breaker groups and servers.
pub fn render(report: &StatusReport, granted: bool) -> Response {
    let mut response = Html(page(report, granted)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn page(report: &StatusReport, granted: bool) -> String {
    let e = escape;
    let mut html = String::with_capacity(4096);
    let ready = if report.readiness.ready {
        "<span class=\"ok\">ready</span>".to_owned()
    } else {
        format!(
            "<span class=\"err\">not ready: {}</span>",
            e(&report.readiness.not_ready.join(", "))
        )
    };
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"refresh\" content=\"5\">\n\
         <title>ipc-gateway status: {id}</title>\n<link rel=\"icon\" href=\"data:,\">\n\
         <link rel=\"stylesheet\" href=\"/page/style.css\">\n</head>\n<body>\n\
         <header class=\"bar\"><h1>ipc-gateway status</h1><code class=\"url\">{id}</code> {ready}\
         <a class=\"link\" href=\"/\">console</a> <a class=\"link\" href=\"/status?format=json\">JSON</a> \
         <a class=\"link\" href=\"/metrics\">metrics</a></header>\n<main class=\"status\">\n",
        id = e(&report.gateway_id),
    );
    let mut rows = vec![
        ("version", e(report.version)),
        ("uptime", e(&uptime(report.uptime_seconds))),
        ("policy version", report.policy_version.to_string()),
        ("names held", report.names_held.to_string()),
        ("listener up", report.readiness.listener_up.to_string()),
        ("shutting down", report.readiness.shutting_down.to_string()),
    ];
    rows.push((
        "audit",
        if report.audit.enabled {
            format!("queue {}, lost {}", report.audit.queue, report.audit.lost)
        } else {
            "off".to_owned()
        },
    ));
    section(
        &mut html,
        "Gateway",
        &["", ""],
        rows.into_iter().map(|(k, v)| vec![e(k), v]),
    );
    section(
        &mut html,
        "Clients",
        &["front-end", "connections", "subscriptions"],
        report.connections.iter().map(|(frontend, open)| {
            let subs = report
                .subscriptions
                .clients
                .get(frontend)
                .copied()
                .unwrap_or(0);
            vec![e(frontend), open.to_string(), subs.to_string()]
        }),
    );
    let _ = writeln!(
        html,
        "<p class=\"muted\">Shared NATS subscriptions: {}</p>",
        report.subscriptions.nats_shared
    );
    section(
        &mut html,
        &format!(
            "NATS pool ({} of {} connected)",
            report.nats.connected, report.nats.pool_size
        ),
        &["slot", "connected", "server"],
        report.nats.connections.iter().map(|c| {
            let server = match (&c.server, &c.server_name) {
                (Some(server), Some(name)) => format!("{} ({})", e(server), e(name)),
                (Some(server), None) => e(server),
                _ if granted => "—".to_owned(),
                _ => "<span class=\"muted\">hidden</span>".to_owned(),
            };
            vec![c.slot.to_string(), c.connected.to_string(), server]
        }),
    );
    section(
        &mut html,
        "Circuit breakers by state",
        &["state", "groups"],
        report
            .breakers_by_state
            .iter()
            .map(|(state, n)| vec![e(state), n.to_string()]),
    );
    if granted {
        section(
            &mut html,
            "Circuit breaker groups",
            &[
                "group",
                "state",
                "consecutive failures",
                "successes",
                "failures",
            ],
            report.full.breakers.iter().map(|g| {
                vec![
                    e(&g.group),
                    e(g.state.as_str()),
                    g.consecutive_failures.to_string(),
                    g.successes.to_string(),
                    g.failures.to_string(),
                ]
            }),
        );
    } else {
        let _ = writeln!(
            html,
            "<p class=\"muted\">{}</p>",
            e(super::status::DETAIL_HIDDEN)
        );
    }
    html.push_str("</main>\n</body>\n</html>\n");
    html
}

/// A table under a heading; every cell must be escaped already.
fn section(html: &mut String, title: &str, head: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let _ = write!(
        html,
        "<section class=\"panel\"><h2>{}</h2>\n<table class=\"kv\">",
        escape(title)
    );
    if head.iter().any(|h| !h.is_empty()) {
        html.push_str("<thead><tr>");
        for h in head {
            let _ = write!(html, "<th>{}</th>", escape(h));
        }
        html.push_str("</tr></thead>");
    }
    html.push_str("<tbody>\n");
    let mut empty = true;
    for row in rows {
        empty = false;
        html.push_str("<tr>");
        for cell in row {
            let _ = write!(html, "<td>{cell}</td>");
        }
        html.push_str("</tr>\n");
    }
    if empty {
        let _ = writeln!(
            html,
            "<tr><td colspan=\"{}\" class=\"muted\">none</td></tr>",
            head.len().max(1)
        );
    }
    html.push_str("</tbody></table></section>\n");
}

fn uptime(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn uptime_reads_as_days_hours_minutes() {
        assert_eq!(uptime(59), "0m 59s");
        assert_eq!(uptime(3_723), "1h 2m 3s");
        assert_eq!(uptime(90_061), "1d 1h 1m");
    }
}
