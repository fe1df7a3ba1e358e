//! Where audit lines go: a file (appended to, rotated by size, reopened on request) or a stream
//! (standard output, or any writer a test hands in). Plain blocking I/O: only the writer thread
//! calls it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// After a rotation fails (the directory cannot be written, say), the next attempt waits this
/// long, so that a broken rotation costs one rename per second rather than one per record.
const ROTATION_RETRY: Duration = Duration::from_secs(1);

pub(super) enum Output {
    File(LogFile),
    Stream(Box<dyn Write + Send>),
}

impl Output {
    pub(super) fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Output::File(file) => file.write(bytes),
            Output::Stream(stream) => stream.write(bytes),
        }
    }

    /// Pushes what a stream buffers (standard output is line-buffered) to its destination.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::File(_) => Ok(()),
            Output::Stream(stream) => stream.flush(),
        }
    }

    /// Whether the file must rotate before a line is written: `before` bytes are waiting ahead
    /// of the line, `after` bytes with it.
    pub(super) fn rotation_due(&self, before: u64, after: u64) -> bool {
        match self {
            Output::File(file) => file.rotation_due(before, after),
            Output::Stream(_) => false,
        }
    }

    pub(super) fn rotate(&mut self) -> io::Result<()> {
        match self {
            Output::File(file) => file.rotate(),
            Output::Stream(_) => Ok(()),
        }
    }

    pub(super) fn reopen(&mut self) -> io::Result<()> {
        match self {
            Output::File(file) => file.reopen(),
            Output::Stream(_) => Ok(()),
        }
    }

    /// Whether there is a file to write to (a failed rotation can leave none until a reopen).
    pub(super) fn is_open(&self) -> bool {
        match self {
            Output::File(file) => file.file.is_some(),
            Output::Stream(_) => true,
        }
    }

    /// At shutdown: the file's data reaches the disk (fsync), or the stream is flushed.
    pub(super) fn close(&mut self) -> io::Result<()> {
        match self {
            Output::File(file) => {
                let result = match &file.file {
                    Some(f) => f.sync_data(),
                    None => Ok(()),
                };
                file.file = None;
                result
            }
            Output::Stream(stream) => stream.flush(),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Output::File(file) => file.path.display().to_string(),
            Output::Stream(_) => "standard output".into(),
        }
    }
}

/// The audit file: appended to, rotated when the next line would take it past `max_bytes`
/// (`audit.jsonl` → `audit.jsonl.1` → … → `audit.jsonl.<keep>`, the oldest deleted), and
/// reopened by path when logrotate moved it away.
pub(super) struct LogFile {
    path: PathBuf,
    /// None only after a rotation renamed the file but could not create the new one.
    file: Option<File>,
    /// Bytes in the current file (its length when opened, plus what we wrote).
    size: u64,
    /// 0: never rotate.
    max_bytes: u64,
    /// Rotated files kept.
    keep: usize,
    /// Set after a failed rotation: no new attempt before then.
    rotation_retry_at: Option<Instant>,
}

impl LogFile {
    pub(super) fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<LogFile> {
        let (file, size) = open_append(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            max_bytes,
            keep,
            rotation_retry_at: None,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let file = self.file.as_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no audit file open (rotation failed)",
            )
        })?;
        let written = file.write(bytes)?;
        self.size += written as u64;
        Ok(written)
    }

    fn rotation_due(&self, before: u64, after: u64) -> bool {
        self.max_bytes > 0
            && self.size + before > 0
            && self.size + after > self.max_bytes
            && self.rotation_retry_at.is_none_or(|at| Instant::now() >= at)
    }

    /// Renames `path.(i)` to `path.(i+1)` from the oldest kept down, `path` to `path.1`, and
    /// starts a new `path`. With `keep` 0 the old file is deleted.
    fn rotate(&mut self) -> io::Result<()> {
        let result = self.shift_and_open();
        self.rotation_retry_at = result.is_err().then(|| Instant::now() + ROTATION_RETRY);
        result
    }

    fn shift_and_open(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            remove_if_present(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                rename_if_present(&numbered(&self.path, n), &numbered(&self.path, n + 1))?;
            }
            fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        // From here the old file is out of the way: records go nowhere until a new one opens.
        self.file = None;
        let (file, size) = open_append(&self.path)?;
        self.file = Some(file);
        self.size = size;
        Ok(())
    }

    /// Opens `path` again (creating it): after logrotate renamed the file, records go to a new
    /// file of that name. If it cannot be opened, the old file (if any) stays in use.
    fn reopen(&mut self) -> io::Result<()> {
        let (file, size) = open_append(&self.path)?;
        self.file = Some(file);
        self.size = size;
        self.rotation_retry_at = None;
        Ok(())
    }
}

/// Opens `path` for appending; a new file gets mode 0640 (less the umask): an audit log names
/// who did what, so it is not for every local user to read.
fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// `audit.jsonl` and 3 → `audit.jsonl.3`.
pub(super) fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(file: &mut LogFile, bytes: &[u8]) {
        assert_eq!(file.write(bytes).unwrap(), bytes.len());
    }

    #[test]
    fn rotation_shifts_numbered_files_and_deletes_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut file = LogFile::open(&path, 10, 2).unwrap();
        for text in ["one\n", "two\n", "three\n", "four\n"] {
            write_all(&mut file, text.as_bytes());
            file.rotate().unwrap();
        }
        write_all(&mut file, b"five\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "five\n");
        assert_eq!(fs::read_to_string(numbered(&path, 1)).unwrap(), "four\n");
        assert_eq!(fs::read_to_string(numbered(&path, 2)).unwrap(), "three\n");
        assert!(!numbered(&path, 3).exists());
    }

    #[test]
    fn new_files_are_not_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut file = LogFile::open(&path, 10, 1).unwrap();
        write_all(&mut file, b"0123456789\n");
        file.rotate().unwrap();
        for file in [path.clone(), numbered(&path, 1)] {
            let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o007, 0, "{} has mode {mode:o}", file.display());
        }
    }

    #[test]
    fn keep_zero_starts_over_without_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut file = LogFile::open(&path, 10, 0).unwrap();
        write_all(&mut file, b"old\n");
        file.rotate().unwrap();
        write_all(&mut file, b"new\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        assert!(!numbered(&path, 1).exists());
    }

    #[test]
    fn rotation_is_due_when_the_next_line_would_pass_max_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, b"12345\n").unwrap();
        let file = LogFile::open(&path, 10, 1).unwrap();
        assert_eq!(file.size, 6);
        assert!(!file.rotation_due(0, 4));
        assert!(file.rotation_due(0, 5));
        let empty = LogFile::open(&dir.path().join("empty"), 10, 1).unwrap();
        // A line longer than max_bytes still goes into an empty file (no rotation loop).
        assert!(!empty.rotation_due(0, 100));
        let never = LogFile::open(&dir.path().join("never"), 0, 1).unwrap();
        assert!(!never.rotation_due(1 << 40, 1 << 41));
    }

    #[test]
    fn a_failed_rotation_keeps_the_file_and_waits_before_trying_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut file = LogFile::open(&path, 4, 1).unwrap();
        write_all(&mut file, b"12345\n");
        // A directory where the rotated file must go makes the rename fail.
        fs::create_dir(numbered(&path, 1)).unwrap();
        fs::write(numbered(&path, 1).join("x"), b"x").unwrap();
        assert!(file.rotate().is_err());
        assert!(!file.rotation_due(0, 10), "retried at once");
        write_all(&mut file, b"more\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "12345\nmore\n");
    }
}
