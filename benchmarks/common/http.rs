//! A tiny HTTP GET for the gateway's /ready and /metrics and nats-server's monitoring port, and
//! readers for the Prometheus text format.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `GET path` on a loopback port: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    stream.take(8 << 20).read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `GET path` on a loopback port; only the status code.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// The sum of a Prometheus metric's samples over all label sets.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    metric_where(text, name, |_| true)
}

/// The sum of a Prometheus metric's samples whose labels contain `label` (e.g.
/// `frontend="ws"`).
pub fn metric_labeled(text: &str, name: &str, label: &str) -> Option<f64> {
    metric_where(text, name, |labels| labels.contains(label))
}

fn metric_where(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some(end) = line.find(['{', ' ']) else {
            continue;
        };
        if &line[..end] != name {
            continue;
        }
        let labels = line[end..]
            .strip_prefix('{')
            .and_then(|rest| rest.split_once('}'))
            .map_or("", |(labels, _)| labels);
        if !keep(labels) {
            continue;
        }
        if let Some(value) = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            sum += value;
            found = true;
        }
    }
    found.then_some(sum)
}
