//! `GET /status`: the gateway's state for operators, as JSON or as a small HTML page.
//!
//! - **Who sees what.** Counts (connections, subscriptions, breakers by state, the audit
//!   queue, the NATS pool's connected flags, names held) are for everyone. What names subjects
//!   or servers (each breaker group, each pool connection's server) only for a caller the
//!   policy grants `status`: by its bearer token (`Authorization`; a bad one is 401), its
//!   verified client certificate (HTTPS with `tls_client_ca`), or both.
//! - **Which form.** `?format=html` or `?format=json` decides; without it, HTML when the
//!   `Accept` header asks for `text/html` (a browser's navigation), JSON otherwise (curl,
//!   scripts). The answer says `Vary: Accept`.

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};

use crate::core::Gateway;
use crate::core::status::StatusReport;
use crate::protocol::{Frontend, GatewayError, Identity};
use crate::tls::PeerCert;

/// What a caller without `status` is told about the missing detail.
pub const DETAIL_HIDDEN: &str = "breaker groups and NATS servers are shown to callers the policy grants status (docs/policy.md)";

/// The form `/status` answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Html,
}

/// `?format=` first, then `Accept`: HTML only when `text/html` is asked for (and not refused
/// with `q=0`).
pub fn negotiate(query: Option<&str>, accept: Option<&str>) -> Format {
    let asked = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("format="));
    match asked {
        Some("html") => return Format::Html,
        Some("json") => return Format::Json,
        _ => {}
    }
    let wants_html = accept.unwrap_or_default().split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        media.eq_ignore_ascii_case("text/html") && !refused
    });
    if wants_html {
        Format::Html
    } else {
        Format::Json
    }
}

/// Who asks for an operator's view (`/status` detail, `/presence`): the verified client
/// certificate of an HTTPS connection, and the bearer token in `Authorization` (its subject
/// joins the certificate's, as on `/ws`); anonymous with neither. A bad token is an error
/// (the routes answer 401).
pub fn operator(
    gateway: &Gateway,
    headers: &HeaderMap,
    cert: Option<Extension<PeerCert>>,
) -> Result<Identity, GatewayError> {
    let mut connection = Identity::anonymous(Frontend::Ws, None);
    connection.cert = cert.map(|Extension(PeerCert(subject))| subject.to_string());
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(crate::core::auth::bearer_from_header);
    match token {
        Some(token) => gateway.verify_token_on(token, &connection),
        None => Ok(connection),
    }
}

pub async fn status(
    State(gateway): State<Gateway>,
    cert: Option<Extension<PeerCert>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let identity = match operator(&gateway, &headers, cert) {
        Ok(identity) => identity,
        Err(error) => return (StatusCode::UNAUTHORIZED, error.to_string()).into_response(),
    };
    let granted = gateway.may_see_status(identity);
    let report = gateway.status_report();
    let report = if granted {
        report.with_detail()
    } else {
        report
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let mut response = match negotiate(query.as_deref(), accept) {
        Format::Json => Json(json(report, granted)).into_response(),
        Format::Html => super::status_page::render(&report, granted),
    };
    let headers = response.headers_mut();
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Authorization"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The JSON body: the report, with `breakers` and each connection's server for a caller
/// granted `status`, and a `detail` note saying what is hidden for anyone else.
pub fn json(report: StatusReport, granted: bool) -> serde_json::Value {
    let breakers = report.full.breakers.clone();
    let report = if granted {
        report.with_detail()
    } else {
        report
    };
    let mut value = serde_json::to_value(&report).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        if granted {
            object.insert(
                "breakers".into(),
                serde_json::to_value(breakers).unwrap_or_default(),
            );
        } else {
            object.insert("detail".into(), DETAIL_HIDDEN.into());
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_decides_then_accept() {
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert_eq!(negotiate(None, Some(browser)), Format::Html);
        assert_eq!(negotiate(None, Some("*/*")), Format::Json);
        assert_eq!(negotiate(None, None), Format::Json);
        assert_eq!(negotiate(None, Some("application/json")), Format::Json);
        assert_eq!(
            negotiate(None, Some("text/html;q=0, application/json")),
            Format::Json
        );
        assert_eq!(negotiate(Some("format=html"), None), Format::Html);
        assert_eq!(
            negotiate(Some("x=1&format=json"), Some(browser)),
            Format::Json
        );
        assert_eq!(
            negotiate(Some("format=yaml"), Some("TEXT/HTML")),
            Format::Html
        );
    }
}
