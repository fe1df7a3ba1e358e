//! systemd's two protocols, written by hand over libc (about 150 lines). `listenfd` takes fds
//! by index only (no `LISTEN_FDNAMES`), accepts a missing `LISTEN_PID` as "for us" and does not
//! check that a socket listens; `sd-notify` would do for the notices, but they are a few lines
//! here, with a bounded send:
//!
//! - **Socket activation** (`sd_listen_fds(3)`): listeners handed over as fds 3, 4, … with
//!   `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`. The names are `uds`, `http` and `grpc`
//!   (`FileDescriptorName=` in the `.socket` unit); a listener not handed over is bound as
//!   usual. Each fd is checked (a listening Unix stream socket for `uds`, a listening TCP
//!   socket for `http` and `grpc`) and any other fd, name or count is a start-up error that
//!   says which. `LISTEN_PID` naming another process means the variables were inherited and
//!   are not for us: they are ignored, as `sd_listen_fds` does.
//! - **Notification** (`sd_notify(3)`): `READY=1`, `STOPPING=1`, `RELOADING=1`, `STATUS=`,
//!   `WATCHDOG=1` as datagrams to `NOTIFY_SOCKET` (a path, or `@name` in the abstract
//!   namespace). Without `NOTIFY_SOCKET` every notice is a no-op.
//!
//! `from_env` reads and unsets the variables, so it must run before any other thread exists
//! (`main` calls it first thing); the variables are not passed on to anything the gateway
//! starts, and a listener is never taken twice.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// What systemd handed to this process: listeners by name, the notification socket and the
/// watchdog interval.
#[derive(Debug, Default)]
pub struct Systemd {
    pub listeners: Listeners,
    pub notifier: Notifier,
    /// `WATCHDOG_USEC` when it is set for this process: ping at half of it.
    pub watchdog: Option<Duration>,
    /// What was ignored and why, for the log (read before logging starts).
    pub notes: Vec<String>,
}

/// Listeners passed by socket activation, each still to be given to tokio (`from_std`) inside
/// the runtime. A field left `None` is bound from the configuration as usual.
#[derive(Debug, Default)]
pub struct Listeners {
    pub uds: Option<std::os::unix::net::UnixListener>,
    pub http: Option<std::net::TcpListener>,
    pub grpc: Option<std::net::TcpListener>,
}

impl Systemd {
    /// Reads `LISTEN_*`, `NOTIFY_SOCKET`, `WATCHDOG_*` and unsets them. An error names what is
    /// wrong with what systemd (or whoever set the variables) passed.
    ///
    /// # Safety
    /// No other thread may exist yet: this changes the process's environment.
    pub unsafe fn from_env() -> Result<Systemd, String> {
        let var = |name: &str| std::env::var(name).ok();
        let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
        let notify = std::env::var_os("NOTIFY_SOCKET");
        let (watchdog_usec, watchdog_pid) = (var("WATCHDOG_USEC"), var("WATCHDOG_PID"));
        for name in [
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        ] {
            // SAFETY: the caller guarantees that no other thread reads the environment.
            unsafe { std::env::remove_var(name) };
        }
        let ours = std::process::id();
        let mut notes = Vec::new();
        let listeners = match (pid, fds) {
            (Some(pid), Some(fds)) => {
                let pid: u32 = pid
                    .parse()
                    .map_err(|_| format!("LISTEN_PID={pid:?} is not a process id"))?;
                if pid == ours {
                    take_listeners(&fds, names.as_deref())?
                } else {
                    notes.push(format!(
                        "LISTEN_FDS is set for process {pid}, not this one ({ours}): ignored, binding as configured"
                    ));
                    Listeners::default()
                }
            }
            (None, None) => Listeners::default(),
            _ => return Err("LISTEN_FDS and LISTEN_PID must be set together".into()),
        };
        let watchdog = match watchdog_usec {
            None => None,
            Some(usec) => {
                let usec: u64 =
                    usec.parse().ok().filter(|&usec| usec > 0).ok_or_else(|| {
                        format!("WATCHDOG_USEC={usec:?} is not a positive number")
                    })?;
                let for_us = watchdog_pid.is_none_or(|pid| pid.parse() == Ok(ours));
                for_us.then(|| Duration::from_micros(usec))
            }
        };
        Ok(Systemd {
            listeners,
            notifier: Notifier::new(notify.map(PathBuf::from))?,
            watchdog,
            notes,
        })
    }
}

/// Takes fds 3 … 3 + `count` - 1 as the listeners `names` names.
fn take_listeners(count: &str, names: Option<&str>) -> Result<Listeners, String> {
    let count: RawFd = count
        .parse()
        .ok()
        .filter(|&n: &RawFd| (0..=64).contains(&n))
        .ok_or_else(|| format!("LISTEN_FDS={count:?} is not a number of descriptors (0 to 64)"))?;
    if count == 0 {
        return Ok(Listeners::default());
    }
    let names: Vec<&str> = match names {
        Some(names) => names.split(':').collect(),
        // Unnamed, one Unix socket is unambiguous; anything else is not.
        None if count == 1 && family(FIRST_FD).ok() == Some(libc::AF_UNIX) => vec!["uds"],
        None => {
            return Err(format!(
                "LISTEN_FDS={count} without LISTEN_FDNAMES: name the sockets uds, http and grpc (FileDescriptorName= in the .socket unit)"
            ));
        }
    };
    if names.len() != count as usize {
        return Err(format!(
            "LISTEN_FDS={count} but LISTEN_FDNAMES has {} names ({})",
            names.len(),
            names.join(":")
        ));
    }
    let mut listeners = Listeners::default();
    for (index, name) in names.into_iter().enumerate() {
        let fd = FIRST_FD + index as RawFd;
        // The gateway starts no programs, but a passed fd must not leak into one either.
        // SAFETY: fcntl on an fd number; an invalid one is an error, checked below.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let taken = match name {
            "uds" if listeners.uds.is_none() => check(fd, name, &[libc::AF_UNIX]).map(|()| {
                // SAFETY: fd is a listening Unix stream socket that nothing else owns.
                listeners.uds = Some(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
            }),
            "http" | "grpc" => {
                let slot = if name == "http" {
                    &mut listeners.http
                } else {
                    &mut listeners.grpc
                };
                if slot.is_some() {
                    Err(format!("LISTEN_FDNAMES names {name} twice"))
                } else {
                    check(fd, name, &[libc::AF_INET, libc::AF_INET6]).map(|()| {
                        // SAFETY: fd is a listening TCP socket that nothing else owns.
                        *slot = Some(unsafe { std::net::TcpListener::from_raw_fd(fd) })
                    })
                }
            }
            "uds" => Err("LISTEN_FDNAMES names uds twice".to_owned()),
            other => Err(format!(
                "socket activation passed fd {fd} named {other:?}; the gateway takes uds, http and grpc (FileDescriptorName= in the .socket unit)"
            )),
        };
        taken?;
    }
    for listener in [
        listeners.uds.as_ref().map(|l| l.set_nonblocking(true)),
        listeners.http.as_ref().map(|l| l.set_nonblocking(true)),
        listeners.grpc.as_ref().map(|l| l.set_nonblocking(true)),
    ]
    .into_iter()
    .flatten()
    {
        listener.map_err(|e| format!("socket activation: {e}"))?;
    }
    Ok(listeners)
}

/// `fd` is a listening stream socket of one of `families`, or the error says what it is.
fn check(fd: RawFd, name: &str, families: &[libc::c_int]) -> Result<(), String> {
    let want = if families.contains(&libc::AF_UNIX) {
        "a listening Unix stream socket (ListenStream=/path)"
    } else {
        "a listening TCP socket (ListenStream=address:port)"
    };
    let bad = |what: String| {
        format!("socket activation: fd {fd} ({name}) is {what}; {name} needs {want}")
    };
    let family = family(fd).map_err(|e| bad(format!("not usable ({e})")))?;
    if !families.contains(&family) {
        let what = match family {
            libc::AF_UNIX => "a Unix socket".to_owned(),
            libc::AF_INET | libc::AF_INET6 => "an IP socket".to_owned(),
            other => format!("a socket of family {other}"),
        };
        return Err(bad(what));
    }
    if sockopt(fd, libc::SO_TYPE).map_err(|e| bad(e.to_string()))? != libc::SOCK_STREAM {
        return Err(bad("not a stream socket (ListenDatagram=?)".into()));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? == 0 {
        return Err(bad("a socket that is not listening".into()));
    }
    Ok(())
}

fn family(fd: RawFd) -> io::Result<libc::c_int> {
    sockopt(fd, libc::SO_DOMAIN)
}

fn sockopt(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for writes of the sizes given.
    let done = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if done == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sd_notify` messages to `NOTIFY_SOCKET`; does nothing when it is not set. A send
/// waits at most `SEND_TIMEOUT` for room in the manager's queue (systemd reads it at once; a
/// manager that does not read loses notices, logged once, rather than stalling the gateway).
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, UnixAddr)>,
    /// A failed send was logged at warn already; later ones go to debug.
    warned: std::sync::atomic::AtomicBool,
}

const SEND_TIMEOUT: Duration = Duration::from_millis(100);

impl Notifier {
    fn new(path: Option<PathBuf>) -> Result<Notifier, String> {
        let Some(path) = path else {
            return Ok(Notifier::default());
        };
        let bad = |e: io::Error| format!("NOTIFY_SOCKET={}: {e}", path.display());
        let address = match path.to_str().and_then(|p| p.strip_prefix('@')) {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                UnixAddr::from_abstract_name(name.as_bytes()).map_err(bad)?
            }
            None if path.is_absolute() => UnixAddr::from_pathname(&path).map_err(bad)?,
            None => {
                return Err(format!(
                    "NOTIFY_SOCKET={} is not an absolute path or @name",
                    path.display()
                ));
            }
        };
        let socket = UnixDatagram::unbound().map_err(bad)?;
        socket.set_write_timeout(Some(SEND_TIMEOUT)).map_err(bad)?;
        Ok(Notifier {
            target: Some((socket, address)),
            warned: Default::default(),
        })
    }

    /// Whether a manager listens (`NOTIFY_SOCKET` was set).
    pub fn is_on(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `message` (newline-separated `KEY=value` lines) as one datagram.
    pub fn notify(&self, message: &str) {
        if let Some((socket, address)) = &self.target
            && let Err(error) = socket.send_to_addr(message.as_bytes(), address)
        {
            if self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!(%error, message, "sd_notify failed");
            } else {
                tracing::warn!(%error, message, "sd_notify failed (logged once)");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=draining");
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` that `Type=notify-reload` (systemd 253) wants;
    /// `ready` ends the reload.
    pub fn reloading(&self) {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: now is a valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"
        ));
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn check_tells_a_unix_listener_from_a_tcp_one_and_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let unix_fd = unix.as_raw_fd();
        assert_eq!(check(unix_fd, "uds", &[libc::AF_UNIX]), Ok(()));
        let tcp_fd = tcp.as_raw_fd();
        assert_eq!(
            check(tcp_fd, "http", &[libc::AF_INET, libc::AF_INET6]),
            Ok(())
        );
        let error = check(tcp_fd, "uds", &[libc::AF_UNIX]).unwrap_err();
        assert!(
            error.contains("is an IP socket; uds needs a listening Unix stream socket"),
            "{error}"
        );
        let error = check(unix_fd, "grpc", &[libc::AF_INET, libc::AF_INET6]).unwrap_err();
        assert!(
            error.contains("is a Unix socket; grpc needs a listening TCP socket"),
            "{error}"
        );
        let error = check(udp.as_raw_fd(), "http", &[libc::AF_INET, libc::AF_INET6]).unwrap_err();
        assert!(error.contains("not a stream socket"), "{error}");
        let unbound = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let error = check(unbound.as_raw_fd(), "http", &[libc::AF_INET]).unwrap_err();
        assert!(error.contains("not listening"), "{error}");
    }

    #[test]
    fn listen_fds_and_names_that_do_not_match_are_errors() {
        let error = take_listeners("2", Some("uds")).unwrap_err();
        assert!(
            error.contains("LISTEN_FDS=2 but LISTEN_FDNAMES has 1 names"),
            "{error}"
        );
        let error = take_listeners("x", None).unwrap_err();
        assert!(error.contains("not a number"), "{error}");
        assert!(take_listeners("0", None).is_ok());
    }

    #[test]
    fn notices_arrive_as_datagrams_on_a_path_and_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(Some(path)).unwrap();
        notifier.ready("serving");
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        let name = format!("ipc-gateway-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let abstract_manager =
            UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let notifier = Notifier::new(Some(PathBuf::from(format!("@{name}")))).unwrap();
        notifier.reloading();
        let n = abstract_manager.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");

        assert!(Notifier::new(Some(PathBuf::from("relative"))).is_err());
        assert!(!Notifier::default().is_on());
        Notifier::default().ready("nobody listens");
    }
}
