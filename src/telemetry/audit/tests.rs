//! The audit log against real temporary files and scripted writers.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::file::numbered;
use super::*;
use crate::protocol::{ErrorCode, Frontend, Id, Op, Subject};

fn config(path: &Path) -> AuditConfig {
    AuditConfig {
        path: Some(path.to_path_buf()),
        ..AuditConfig::default()
    }
}

fn lines(path: &Path) -> Vec<Value> {
    parse(&fs::read_to_string(path).unwrap())
}

fn parse(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect()
}

/// A counter's or gauge's value in the Prometheus text.
fn metric(metrics: &Metrics, name: &str) -> u64 {
    let text = metrics.render();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse::<f64>()
        .unwrap() as u64
}

fn numbered_record(n: u64) -> Record {
    Record::new(Op::Publish)
        .id(n.into())
        .subject(Subject::from_static("events.a"))
        .ok()
}

/// Splits what was written into caller records and the sum of `audit_lost` counts.
fn written_and_lost(records: &[Value]) -> (u64, u64) {
    let mut written = 0;
    let mut lost = 0;
    for record in records {
        if record["op"] == "audit_lost" {
            lost += record["count"].as_u64().unwrap();
        } else {
            written += 1;
        }
    }
    (written, lost)
}

/// A writer that collects what it is given.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Gate = Arc<(Mutex<bool>, Condvar)>;

/// A writer whose first write stops until the gate opens (a disk that hangs), telling the
/// test when the writer thread is stuck in it.
struct Gated {
    out: SharedBuf,
    gate: Gate,
    entered: Option<mpsc::Sender<()>>,
}

fn gated() -> (Gated, SharedBuf, Gate, mpsc::Receiver<()>) {
    let out = SharedBuf::default();
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let (tx, rx) = mpsc::channel();
    let writer = Gated {
        out: out.clone(),
        gate: gate.clone(),
        entered: Some(tx),
    };
    (writer, out, gate, rx)
}

fn open(gate: &(Mutex<bool>, Condvar)) {
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}

impl Write for Gated {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(entered) = self.entered.take() {
            let _ = entered.send(());
        }
        let mut open = self.gate.0.lock().unwrap();
        while !*open {
            open = self.gate.1.wait(open).unwrap();
        }
        self.out.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that fails (disk full) while `failing` is set; with `partial`, the first failing
/// call first takes half of what it is given, as a filling disk does.
#[derive(Clone)]
struct Flaky {
    out: SharedBuf,
    failing: Arc<Mutex<bool>>,
    partial: Arc<Mutex<bool>>,
}

impl Write for Flaky {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if *self.failing.lock().unwrap() {
            if std::mem::take(&mut *self.partial.lock().unwrap()) && bytes.len() > 1 {
                return self.out.write(&bytes[..bytes.len() / 2]);
            }
            return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left"));
        }
        self.out.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn records_land_as_json_lines_with_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = Metrics::new();
    let audit = Audit::start(config(&path), metrics.clone()).unwrap();
    assert!(audit.is_on());
    let identity = AuditIdentity {
        uid: Some(1001),
        gid: Some(100),
        pid: Some(4242),
        user: Some("alice".into()),
        group: Some("staff".into()),
        ..Default::default()
    };
    let conn = AuditConn::new(Frontend::Uds, 7, identity);
    audit.record(conn.connected());
    let reservation = audit.reserve().await;
    reservation.write(
        conn.record(Op::Request)
            .subject(Subject::from_static("svc.orders.create"))
            .id(1u64.into())
            .ok()
            .latency(Duration::from_micros(812))
            .bytes_in(5)
            .bytes_out(7),
    );
    audit.reserve().await.write(
        conn.record(Op::Subscribe)
            .subject(Subject::from_static("$SYS.>"))
            .id(Id::Text("s1".into()))
            .error(ErrorCode::Forbidden)
            .message("subscribe to $SYS.> is not allowed"),
    );
    audit.record(conn.disconnected("client"));
    audit.record(Record::policy_reload(Ok(())).reason("sighup"));
    audit.shutdown().await.unwrap();

    let records = lines(&path);
    let ops: Vec<&str> = records.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "connect",
            "request",
            "subscribe",
            "disconnect",
            "policy_reload"
        ]
    );
    let request = &records[1];
    assert_eq!(request["frontend"], "uds");
    assert_eq!(request["conn"], 7);
    assert_eq!(request["id"], 1);
    assert_eq!(request["subject"], "svc.orders.create");
    assert_eq!(request["outcome"], "ok");
    assert_eq!(request["latency_us"], 812);
    assert_eq!(request["bytes_in"], 5);
    assert_eq!(request["bytes_out"], 7);
    assert_eq!(
        request["identity"],
        serde_json::json!({"uid":1001,"gid":100,"pid":4242,"user":"alice","group":"staff"})
    );
    assert_eq!(records[2]["id"], "s1");
    assert_eq!(records[2]["outcome"], "FORBIDDEN");
    assert_eq!(records[3]["reason"], "client");
    assert!(records[4].get("identity").is_none());
    for record in &records {
        let ts = record["ts"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    }
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_total"), 5);
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_lost_total"), 0);
}

#[tokio::test]
async fn drop_mode_counts_every_lost_record_in_an_audit_lost_record() {
    let (writer, out, gate, entered) = gated();
    let metrics = Metrics::new();
    let config = AuditConfig {
        queue: 4,
        ..AuditConfig::default()
    };
    let audit = Audit::start_with_writer(config, metrics.clone(), Box::new(writer)).unwrap();
    audit.record(numbered_record(0));
    // The writer has formatted record 0 (its slot is free again) and hangs writing it.
    entered.recv().unwrap();
    for n in 1..100 {
        // In drop mode a reservation never waits.
        audit.reserve().await.write(numbered_record(n));
    }
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_lost_total"), 95);
    open(&gate);
    audit.shutdown().await.unwrap();

    let records = parse(&out.text());
    let ids: Vec<u64> = records.iter().filter_map(|r| r["id"].as_u64()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4], "the first four fit the queue");
    let notice = records.last().unwrap();
    assert_eq!(notice["op"], "audit_lost");
    assert_eq!(notice["count"], 95);
    assert_eq!(written_and_lost(&records), (5, 95));
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_total"), 5);
}

#[test]
fn drop_mode_accounting_is_exact_under_concurrent_floods() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = Metrics::new();
    let config = AuditConfig {
        queue: 64,
        ..config(&path)
    };
    let audit = Audit::start(config, metrics.clone()).unwrap();
    const THREADS: u64 = 4;
    const EACH: u64 = 20_000;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let audit = audit.clone();
            scope.spawn(move || {
                for n in 0..EACH {
                    audit.record(numbered_record(t * EACH + n));
                }
            });
        }
    });
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(audit.shutdown())
        .unwrap();

    let (written, lost) = written_and_lost(&lines(&path));
    assert_eq!(
        written + lost,
        THREADS * EACH,
        "written {written}, lost {lost}"
    );
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_total"), written);
    assert_eq!(
        metric(&metrics, "ipc_gateway_audit_records_lost_total"),
        lost
    );
}

#[tokio::test]
async fn block_mode_reservations_wait_for_room_and_lose_nothing() {
    let (writer, out, gate, entered) = gated();
    let metrics = Metrics::new();
    let config = AuditConfig {
        queue: 2,
        overflow: Overflow::Block,
        ..AuditConfig::default()
    };
    let audit = Audit::start_with_writer(config, metrics.clone(), Box::new(writer)).unwrap();
    audit.reserve().await.write(numbered_record(0));
    entered.recv().unwrap();
    let first = audit.reserve().await;
    let second = audit.reserve().await;
    assert!(first.holds_slot() && second.holds_slot());
    assert!(
        tokio::time::timeout(Duration::from_millis(50), audit.reserve())
            .await
            .is_err(),
        "a third reservation must wait while two hold the queue"
    );
    first.write(numbered_record(1));
    second.write(numbered_record(2));
    let waiting = tokio::spawn({
        let audit = audit.clone();
        async move { audit.reserve().await.write(numbered_record(3)) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the queue is still full");
    open(&gate);
    waiting.await.unwrap();
    audit.shutdown().await.unwrap();

    let ids: Vec<u64> = parse(&out.text())
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_lost_total"), 0);
}

#[tokio::test]
async fn try_reserve_is_ready_unless_block_mode_is_full() {
    assert!(Audit::off().try_reserve().is_some());
    let (writer, _out, gate, entered) = gated();
    let config = AuditConfig {
        queue: 1,
        overflow: Overflow::Drop,
        ..AuditConfig::default()
    };
    let dropping = Audit::start_with_writer(config, Metrics::new(), Box::new(writer)).unwrap();
    dropping.record(numbered_record(0));
    entered.recv().unwrap();
    dropping.record(numbered_record(1));
    let ready = dropping.try_reserve().expect("drop mode never waits");
    assert!(!ready.holds_slot());
    open(&gate);
    dropping.shutdown().await.unwrap();

    let (writer, _out, gate, entered) = gated();
    let config = AuditConfig {
        queue: 1,
        overflow: Overflow::Block,
        ..AuditConfig::default()
    };
    let blocking = Audit::start_with_writer(config, Metrics::new(), Box::new(writer)).unwrap();
    blocking.reserve().await.write(numbered_record(0));
    entered.recv().unwrap();
    let held = blocking
        .try_reserve()
        .expect("a free slot is taken at once");
    assert!(held.holds_slot());
    assert!(
        blocking.try_reserve().is_none(),
        "the queue is full: it would wait"
    );
    held.write(numbered_record(1));
    open(&gate);
    blocking.shutdown().await.unwrap();
    let after = blocking
        .try_reserve()
        .expect("after shutdown nothing waits");
    assert!(!after.holds_slot());
}

#[test]
fn block_mode_loses_nothing_under_a_flood() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = Metrics::new();
    let config = AuditConfig {
        queue: 8,
        overflow: Overflow::Block,
        ..config(&path)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    const TASKS: u64 = 8;
    const EACH: u64 = 5_000;
    runtime.block_on(async {
        let audit = Audit::start(config, metrics.clone()).unwrap();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let audit = audit.clone();
                tokio::spawn(async move {
                    for n in 0..EACH {
                        let reservation = audit.reserve().await;
                        reservation.write(
                            Record::new(Op::Request)
                                .conn(t)
                                .id(n.into())
                                .error(ErrorCode::Timeout),
                        );
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        audit.shutdown().await.unwrap();
    });

    let records = lines(&path);
    assert_eq!(records.len() as u64, TASKS * EACH);
    let mut next: HashMap<u64, u64> = HashMap::new();
    for record in &records {
        let expected = next.entry(record["conn"].as_u64().unwrap()).or_default();
        assert_eq!(
            record["id"].as_u64().unwrap(),
            *expected,
            "in order per task"
        );
        *expected += 1;
    }
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_lost_total"), 0);
    assert_eq!(
        metric(&metrics, "ipc_gateway_audit_records_total"),
        TASKS * EACH
    );
}

#[tokio::test]
async fn block_mode_record_goes_over_the_bound_instead_of_being_lost() {
    let (writer, out, gate, entered) = gated();
    let config = AuditConfig {
        queue: 1,
        overflow: Overflow::Block,
        ..AuditConfig::default()
    };
    let audit = Audit::start_with_writer(config, Metrics::new(), Box::new(writer)).unwrap();
    audit.record(numbered_record(0));
    entered.recv().unwrap();
    let held = audit.reserve().await;
    for n in 1..4 {
        // The only slot is held: these go in over the bound, without waiting.
        audit.record(numbered_record(n));
    }
    held.write(numbered_record(4));
    open(&gate);
    audit.shutdown().await.unwrap();
    let ids: Vec<u64> = parse(&out.text())
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn a_reservation_dropped_unused_gives_its_slot_back() {
    let config = AuditConfig {
        queue: 1,
        overflow: Overflow::Block,
        ..AuditConfig::default()
    };
    let out = SharedBuf::default();
    let audit = Audit::start_with_writer(config, Metrics::new(), Box::new(out.clone())).unwrap();
    for _ in 0..3 {
        let reservation = tokio::time::timeout(Duration::from_secs(5), audit.reserve())
            .await
            .expect("the slot came back");
        drop(reservation);
    }
    audit.shutdown().await.unwrap();
    assert_eq!(out.text(), "");
}

#[tokio::test]
async fn queued_counts_the_slots_held_now_not_as_of_the_last_batch() {
    let config = AuditConfig {
        queue: 8,
        overflow: Overflow::Block,
        ..AuditConfig::default()
    };
    let out = SharedBuf::default();
    let audit = Audit::start_with_writer(config, Metrics::new(), Box::new(out.clone())).unwrap();
    assert_eq!(audit.queued(), 0);
    let first = audit.reserve().await;
    let second = audit.reserve().await;
    assert_eq!(audit.queued(), 2, "two operations running hold a slot each");
    drop(first);
    assert_eq!(audit.queued(), 1);
    drop(second);
    assert_eq!(audit.queued(), 0);
    audit.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_wakes_waiting_reservations_and_later_records_are_counted_lost() {
    let metrics = Metrics::new();
    let config = AuditConfig {
        queue: 1,
        overflow: Overflow::Block,
        ..AuditConfig::default()
    };
    let out = SharedBuf::default();
    let audit = Audit::start_with_writer(config, metrics.clone(), Box::new(out.clone())).unwrap();
    let held = audit.reserve().await;
    let waiting = tokio::spawn({
        let audit = audit.clone();
        async move { audit.reserve().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    audit.shutdown().await.unwrap();
    let late = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("shutdown wakes it")
        .unwrap();
    assert!(!late.holds_slot());
    late.write(numbered_record(1));
    held.write(numbered_record(2));
    audit.record(numbered_record(3));
    assert_eq!(out.text(), "");
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_lost_total"), 3);
    assert_eq!(
        audit.shutdown().await,
        Ok(()),
        "a second shutdown is harmless"
    );
}

#[tokio::test]
async fn rotation_at_max_bytes_keeps_keep_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let config = AuditConfig {
        max_bytes: 2_000,
        keep: 3,
        ..config(&path)
    };
    let audit = Audit::start(config, Metrics::new()).unwrap();
    for n in 0..300 {
        audit.record(numbered_record(n));
        if n % 7 == 0 {
            // Rotation must work whether records come one by one or in batches.
            audit.flush().await.unwrap();
        }
    }
    audit.shutdown().await.unwrap();

    assert!(!numbered(&path, 4).exists());
    let mut ids = Vec::new();
    for file in [
        numbered(&path, 3),
        numbered(&path, 2),
        numbered(&path, 1),
        path.clone(),
    ] {
        let size = fs::metadata(&file).unwrap().len();
        assert!(size <= 2_000, "{} is {size} bytes", file.display());
        assert!(
            size > 1_800 || file == path,
            "{} is only {size} bytes",
            file.display()
        );
        ids.extend(lines(&file).iter().map(|r| r["id"].as_u64().unwrap()));
    }
    assert_eq!(ids.last(), Some(&299));
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "the kept files hold the newest records, in order"
    );
}

#[tokio::test]
async fn reopen_after_logrotate_moved_the_file_writes_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let moved = dir.path().join("audit.jsonl-20261206");
    let audit = Audit::start(config(&path), Metrics::new()).unwrap();
    audit.record(numbered_record(1));
    audit.flush().await.unwrap();
    fs::rename(&path, &moved).unwrap();
    // Until the reopen the writer still holds the moved file.
    audit.record(numbered_record(2));
    audit.flush().await.unwrap();
    audit.reopen().await.unwrap();
    audit.record(numbered_record(3));
    audit.shutdown().await.unwrap();

    let ids = |file: &Path| -> Vec<u64> {
        lines(file)
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&moved), [1, 2]);
    assert_eq!(ids(&path), [3]);
}

#[tokio::test]
async fn a_failed_reopen_keeps_writing_to_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("logs");
    fs::create_dir(&sub).unwrap();
    let path = sub.join("audit.jsonl");
    let metrics = Metrics::new();
    let audit = Audit::start(config(&path), metrics.clone()).unwrap();
    fs::rename(&sub, dir.path().join("gone")).unwrap();
    let err = audit.reopen().await.unwrap_err();
    assert!(err.contains("cannot reopen"), "{err}");
    audit.record(numbered_record(1));
    audit.shutdown().await.unwrap();
    assert_eq!(lines(&dir.path().join("gone/audit.jsonl")).len(), 1);
    assert_eq!(metric(&metrics, "ipc_gateway_audit_write_errors_total"), 1);
}

#[tokio::test]
async fn shutdown_writes_everything_queued_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = Metrics::new();
    let audit = Audit::start(config(&path), metrics.clone()).unwrap();
    for n in 0..20_000 {
        audit.reserve().await.write(numbered_record(n));
    }
    audit.shutdown().await.unwrap();
    let records = lines(&path);
    assert_eq!(records.len(), 20_000);
    assert_eq!(records[19_999]["id"], 19_999);
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_total"), 20_000);
}

#[tokio::test]
async fn dropping_every_handle_writes_what_was_queued() {
    let out = SharedBuf::default();
    let audit = Audit::start_with_writer(
        AuditConfig::default(),
        Metrics::new(),
        Box::new(out.clone()),
    )
    .unwrap();
    audit.record(numbered_record(1));
    drop(audit);
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.text().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(parse(&out.text()).len(), 1);
}

#[tokio::test]
async fn write_errors_are_counted_and_retried_without_losing_records() {
    let out = SharedBuf::default();
    let failing = Arc::new(Mutex::new(false));
    let partial = Arc::new(Mutex::new(true));
    let writer = Flaky {
        out: out.clone(),
        failing: failing.clone(),
        partial,
    };
    let metrics = Metrics::new();
    let audit = Audit::start_with_writer(AuditConfig::default(), metrics.clone(), Box::new(writer))
        .unwrap();
    audit.record(numbered_record(0));
    audit.flush().await.unwrap();
    *failing.lock().unwrap() = true;
    audit.record(numbered_record(1));
    let err = audit.flush().await.unwrap_err();
    assert!(err.contains("no space left"), "{err}");
    for n in 2..50 {
        audit.record(numbered_record(n));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        metric(&metrics, "ipc_gateway_audit_write_errors_total") >= 2,
        "retried"
    );
    *failing.lock().unwrap() = false;
    audit.shutdown().await.unwrap();

    // Half a line went out before the disk filled; the rest followed it: every line whole.
    let ids: Vec<u64> = parse(&out.text())
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (0..50).collect::<Vec<_>>());
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_total"), 50);
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_lost_total"), 0);
}

#[tokio::test]
async fn shutdown_while_writes_fail_reports_the_records_it_loses() {
    let writer = Flaky {
        out: SharedBuf::default(),
        failing: Arc::new(Mutex::new(true)),
        partial: Arc::new(Mutex::new(false)),
    };
    let metrics = Metrics::new();
    let audit = Audit::start_with_writer(AuditConfig::default(), metrics.clone(), Box::new(writer))
        .unwrap();
    for n in 0..3 {
        audit.record(numbered_record(n));
    }
    let err = audit.shutdown().await.unwrap_err();
    assert!(err.contains("3 audit records are lost"), "{err}");
    assert_eq!(metric(&metrics, "ipc_gateway_audit_records_lost_total"), 3);
    assert_eq!(audit.shutdown().await, Err(err), "the same answer again");
}

#[tokio::test]
async fn a_writer_gets_the_lines_standard_output_would() {
    let out = SharedBuf::default();
    let audit = Audit::start_with_writer(
        AuditConfig::default(),
        Metrics::new(),
        Box::new(out.clone()),
    )
    .unwrap();
    audit.record(Record::policy_reload(Err(ErrorCode::BadRequest)).message("line 3: bad grant"));
    audit.flush().await.unwrap();
    let records = parse(&out.text());
    assert_eq!(records[0]["op"], "policy_reload");
    assert_eq!(records[0]["outcome"], "BAD_REQUEST");
    audit.shutdown().await.unwrap();

    let stdout = Audit::start(
        AuditConfig {
            path: Some("-".into()),
            ..AuditConfig::default()
        },
        Metrics::new(),
    )
    .unwrap();
    assert!(stdout.is_on());
    assert_eq!(
        stdout.reopen().await,
        Ok(()),
        "reopening standard output does nothing"
    );
    stdout.shutdown().await.unwrap();
}

#[test]
fn a_bad_path_fails_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing/audit.jsonl");
    let err = Audit::start(config(&path), Metrics::new()).unwrap_err();
    assert!(
        err.starts_with(&format!("audit file {}: ", path.display())),
        "{err}"
    );
    let err = Audit::start(
        AuditConfig {
            queue: 0,
            ..config(&dir.path().join("a"))
        },
        Metrics::new(),
    )
    .unwrap_err();
    assert!(err.contains("audit queue"), "{err}");
}

#[tokio::test]
async fn off_records_nothing_and_never_waits() {
    let audit = Audit::start(AuditConfig::default(), Metrics::new()).unwrap();
    assert!(!audit.is_on());
    let reservation = audit.reserve().await;
    assert!(!reservation.holds_slot());
    reservation.write(numbered_record(1));
    audit.record(numbered_record(2));
    assert_eq!(audit.flush().await, Ok(()));
    assert_eq!(audit.reopen().await, Ok(()));
    assert_eq!(audit.shutdown().await, Ok(()));
}

#[test]
fn overflow_parses_from_flags_and_toml() {
    assert_eq!("drop".parse::<Overflow>(), Ok(Overflow::Drop));
    assert_eq!("block".parse::<Overflow>(), Ok(Overflow::Block));
    assert!(
        "wait"
            .parse::<Overflow>()
            .unwrap_err()
            .contains("drop or block")
    );
    #[derive(serde::Deserialize)]
    struct Settings {
        overflow: Overflow,
    }
    let settings: Settings = serde_json::from_str(r#"{"overflow":"block"}"#).unwrap();
    assert_eq!(settings.overflow, Overflow::Block);
    assert_eq!(Overflow::default(), Overflow::Drop);
    assert_eq!(Overflow::Block.to_string(), "block");
}

/// What a record costs the caller (build it, reserve, write it into the queue) and how many
/// records a second the writer thread gets into a file. Run it in release mode:
///
/// `cargo test --release --lib telemetry::audit::tests::bench_audit -- --ignored --nocapture`
///
/// Each row is the median of `AUDIT_BENCH_RUNS` runs (default 5). It prints a Markdown report
/// and writes it to `artifacts/audit/writer.md`.
#[test]
#[ignore]
fn bench_audit() {
    use std::fmt::Write as _;
    use std::hint::black_box;

    const N: u64 = 1_000_000;
    /// Records per burst in the paced rows; the writer catches up between bursts.
    const BURST: u64 = 64;
    let runs: usize = std::env::var("AUDIT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let conn = AuditConn::new(
        Frontend::Uds,
        42,
        AuditIdentity {
            uid: Some(1001),
            gid: Some(1001),
            pid: Some(4242),
            user: Some("alice".into()),
            group: Some("alice".into()),
            ..Default::default()
        },
    );
    let subject = Subject::from_static("svc.orders.create");
    let make = |n: u64| {
        conn.record(Op::Request)
            .subject(subject.clone())
            .id(n.into())
            .ok()
            .latency(Duration::from_micros(85))
            .bytes_in(128)
            .bytes_out(128)
    };
    let ns = |elapsed: Duration, count: u64| elapsed.as_nanos() as f64 / count as f64;
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let mut rows: Vec<(String, String)> = Vec::new();

    // The clock read every record makes.
    let clock = median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..N {
                    black_box(std::time::SystemTime::now());
                }
                ns(start.elapsed(), N)
            })
            .collect(),
    );
    rows.push((
        "read the clock (`SystemTime::now`)".into(),
        format!("{clock:.0} ns"),
    ));

    let build = median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                for n in 0..N {
                    black_box(make(n));
                }
                ns(start.elapsed(), N)
            })
            .collect(),
    );
    rows.push((
        "build a request record (clock included), caller".into(),
        format!("{build:.0} ns"),
    ));

    let off = Audit::off();
    let off_total = median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                runtime.block_on(async {
                    for n in 0..N {
                        off.reserve().await.write(black_box(make(n)));
                    }
                });
                ns(start.elapsed(), N)
            })
            .collect(),
    );
    rows.push((
        "audit off: build + reserve + write, caller".into(),
        format!("{off_total:.0} ns (the build alone: {build:.0} ns)"),
    ));

    for overflow in [Overflow::Drop, Overflow::Block] {
        // Paced: bursts of BURST records, the writer catching up between them (not timed).
        let mut paced = Vec::new();
        for _ in 0..runs {
            let dir = tempfile::tempdir().unwrap();
            let config = AuditConfig {
                overflow,
                ..config(&dir.path().join("audit.jsonl"))
            };
            let audit = Audit::start(config, Metrics::new()).unwrap();
            let records: Vec<Vec<Record>> = (0..N / BURST / 10)
                .map(|b| (0..BURST).map(|n| make(b * BURST + n)).collect())
                .collect();
            let mut enqueue = Duration::ZERO;
            runtime.block_on(async {
                for burst in records {
                    let start = Instant::now();
                    for record in burst {
                        audit.reserve().await.write(record);
                    }
                    enqueue += start.elapsed();
                    audit.flush().await.unwrap();
                }
                audit.shutdown().await.unwrap();
            });
            paced.push(ns(enqueue, N / 10));
        }
        rows.push((
            format!("{overflow}: reserve + write a built record, bursts of {BURST} while the writer keeps up, caller"),
            format!("{:.0} ns", median(paced)),
        ));

        // Flood: one task makes records as fast as it can.
        let mut flood = Vec::new();
        let mut throughput = Vec::new();
        let mut lost_share = Vec::new();
        let mut mb = Vec::new();
        for _ in 0..runs {
            let dir = tempfile::tempdir().unwrap();
            let metrics = Metrics::new();
            let config = AuditConfig {
                overflow,
                ..config(&dir.path().join("audit.jsonl"))
            };
            let audit = Audit::start(config, metrics.clone()).unwrap();
            let start = Instant::now();
            runtime.block_on(async {
                for n in 0..N {
                    audit.reserve().await.write(make(n));
                }
            });
            let offered = start.elapsed();
            runtime.block_on(audit.shutdown()).unwrap();
            let total = start.elapsed();
            let written = metric(&metrics, "ipc_gateway_audit_records_total");
            let lost = metric(&metrics, "ipc_gateway_audit_records_lost_total");
            assert_eq!(written + lost, N);
            let bytes: u64 = fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().metadata().unwrap().len())
                .sum();
            flood.push(ns(offered, N));
            throughput.push(written as f64 / total.as_secs_f64());
            lost_share.push(lost as f64 / N as f64 * 100.0);
            mb.push(bytes as f64 / total.as_secs_f64() / 1e6);
        }
        rows.push((
            format!("{overflow}: build + reserve + write in a flood, caller"),
            format!(
                "{:.0} ns a record; {:.0} % lost",
                median(flood),
                median(lost_share)
            ),
        ));
        rows.push((
            format!("{overflow}: flood, writer (first record to shutdown done)"),
            format!(
                "{:.0} records/s written, {:.0} MB/s",
                median(throughput),
                median(mb)
            ),
        ));
    }

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(|m| m.trim().to_string())
            })
        })
        .unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default();
    let mut report = String::new();
    writeln!(
        report,
        "# Audit log: cost per record and writer throughput\n\n\
         `cargo test --release --lib telemetry::audit::tests::bench_audit -- --ignored --nocapture`\n\n\
         commit {commit}, {profile} build, {} CPUs ({cpu}) shared with other work (load average \
         at the end: {}); request records of {} bytes (five identity fields) made by one \
         current-thread Tokio runtime, written by the writer thread to a file on ext4 with the \
         default settings (queue 65,536, rotation at 100 MiB). {N} records a row ({} in the \
         paced rows), median of {runs} runs.\n\n| what | result |\n| --- | --- |",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        make(0).to_json().len() + 1,
        N / 10,
    )
    .unwrap();
    for (what, result) in rows {
        writeln!(report, "| {what} | {result} |").unwrap();
    }
    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/audit");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("writer.md"), report).unwrap();
}

/// One record of each kind, as docs/audit.md shows them.
fn examples() -> Vec<Record> {
    use std::time::UNIX_EPOCH;
    let at = |micros: u64| UNIX_EPOCH + Duration::from_micros(1_796_516_596_000_000 + micros);
    let alice = AuditConn::new(
        Frontend::Uds,
        7,
        AuditIdentity {
            uid: Some(1001),
            gid: Some(100),
            pid: Some(4242),
            user: Some("alice".into()),
            group: Some("staff".into()),
            ..Default::default()
        },
    );
    let anonymous = AuditConn::new(
        Frontend::Ws,
        12,
        AuditIdentity {
            addr: Some("127.0.0.1:51234".into()),
            ..Default::default()
        },
    );
    let mut bob = anonymous.clone();
    bob.set_identity(AuditIdentity {
        sub: Some("bob".into()),
        addr: Some("127.0.0.1:51234".into()),
        ..Default::default()
    });
    let service = AuditConn::new(
        Frontend::Grpc,
        31,
        AuditIdentity {
            sub: Some("billing".into()),
            addr: Some("10.0.0.8:40512".into()),
            ..Default::default()
        },
    );
    vec![
        alice.connected().at(at(123_456)),
        alice
            .record(Op::Request)
            .at(at(125_012))
            .id(1u64.into())
            .subject(Subject::from_static("svc.orders.create"))
            .ok()
            .latency(Duration::from_micros(812))
            .bytes_in(64)
            .bytes_out(23),
        alice
            .record(Op::Publish)
            .at(at(125_400))
            .subject(Subject::from_static("orders.created"))
            .ok()
            .bytes_in(120),
        alice
            .record(Op::Request)
            .at(at(5_131_877))
            .id(2u64.into())
            .subject(Subject::from_static("svc.orders.create"))
            .error(ErrorCode::Timeout)
            .latency(Duration::from_micros(5_000_861))
            .bytes_in(64)
            .message("no reply from svc.orders.create within 5000 ms"),
        alice
            .record(AuditOp::Invalid)
            .at(at(5_200_003))
            .error(ErrorCode::TooLarge)
            .bytes_in(2_097_152)
            .message("frame of 2097152 bytes is over the limit of 1048576"),
        alice.disconnected("client").at(at(5_210_550)),
        anonymous.connected().at(at(6_000_101)),
        anonymous
            .record(Op::Subscribe)
            .at(at(6_000_922))
            .id(Id::Text("s1".into()))
            .subject(Subject::from_static("$SYS.>"))
            .error(ErrorCode::Forbidden)
            .message("subscribe to $SYS.> is not allowed"),
        bob.record(AuditOp::Auth).at(at(6_105_310)).ok(),
        bob.record(Op::Subscribe)
            .at(at(6_105_933))
            .id(Id::Text("s2".into()))
            .subject(Subject::from_static("events.>"))
            .ok(),
        bob.record(Op::Unsubscribe)
            .at(at(9_871_002))
            .id(Id::Text("s2".into()))
            .ok(),
        bob.disconnected("idle").at(at(69_871_120)),
        AuditConn::new(
            Frontend::Ws,
            13,
            AuditIdentity {
                addr: Some("127.0.0.1:51240".into()),
                ..Default::default()
            },
        )
        .refused(ErrorCode::Unauthenticated)
        .at(at(70_000_015))
        .message("token expired"),
        service
            .record(Op::Request)
            .at(at(70_100_000))
            .id(9u64.into())
            .subject(Subject::from_static("svc.payments.charge"))
            .error(ErrorCode::CircuitOpen)
            .latency(Duration::from_micros(4))
            .bytes_in(310)
            .message("svc.payments is failing; retry after 3200 ms"),
        service
            .record(Op::Publish)
            .at(at(70_100_250))
            .subject(Subject::from_static("audit.trail"))
            .error(ErrorCode::Overloaded)
            .bytes_in(88)
            .message("payload bytes in flight are at the limit"),
        AuditConn::new(
            Frontend::Grpc,
            32,
            AuditIdentity {
                addr: Some("10.0.0.9:40600".into()),
                ..Default::default()
            },
        )
        .refused(ErrorCode::Overloaded)
        .at(at(70_200_000))
        .message("connection limit of 10000 reached"),
        Record::policy_reload(Ok(()))
            .at(at(80_000_000))
            .reason("sighup")
            .message("/etc/ipc-gateway/policy.toml: 4 grants"),
        Record::policy_reload(Err(ErrorCode::BadRequest))
            .at(at(90_000_000))
            .reason("sighup")
            .message(
                "/etc/ipc-gateway/policy.toml line 7: unknown field `alow`; the old policy stays",
            ),
        Record::audit_lost(1_532).at(at(95_000_000)),
    ]
}

#[test]
fn the_documented_examples_are_what_the_writer_writes() {
    let docs = include_str!("../../../docs/audit.md");
    let missing: Vec<String> = examples()
        .iter()
        .map(Record::to_json)
        .filter(|line| !docs.contains(line.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/audit.md lacks these lines:\n{}",
        missing.join("\n")
    );
}
