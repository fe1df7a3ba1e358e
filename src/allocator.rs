//! The process's memory allocator, chosen when the binary is built (the library never picks
//! one). The default build uses jemalloc (the `jemalloc` feature, on by default): of glibc
//! malloc, glibc with its tunables or a periodic `malloc_trim`, mimalloc and jemalloc, it gave
//! memory back best after bursts and subscription churn, at no cost per request (the numbers:
//! artifacts/memory/latest.md; docs/operations.md, "Memory and the allocator").
//!
//! - `jemalloc` (default): jemalloc built from the crate's vendored source, with background
//!   threads returning unused pages (settings below).
//! - `mimalloc`: mimalloc (its C source is built by the crate).
//! - `--no-default-features`: glibc malloc; `IPC_GATEWAY_MALLOC_TRIM_MS` > 0 starts a thread
//!   that calls `malloc_trim(0)` that often, handing freed pages of every arena back.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read once at start-up (`_RJEM_MALLOC_CONF` in the environment is read
/// after them and wins): background threads purge unused pages, dirty pages are kept at most
/// a second, and no page is kept "muzzy" (advised away but still mapped).
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: Option<&'static std::ffi::c_char> =
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

/// The allocator in use, for the start-up log line.
pub const NAME: &str = if cfg!(feature = "mimalloc") {
    "mimalloc"
} else if cfg!(feature = "jemalloc") {
    "jemalloc"
} else {
    "system (glibc malloc)"
};

/// With glibc malloc, trims every arena every `IPC_GATEWAY_MALLOC_TRIM_MS` milliseconds (off
/// when unset or 0). Does nothing with another allocator.
pub fn start_trimming() {
    #[cfg(all(
        target_os = "linux",
        target_env = "gnu",
        not(any(feature = "mimalloc", feature = "jemalloc"))
    ))]
    {
        let every = std::env::var("IPC_GATEWAY_MALLOC_TRIM_MS")
            .ok()
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .filter(|ms| *ms > 0);
        if let Some(ms) = every {
            let every = std::time::Duration::from_millis(ms);
            let _ = std::thread::Builder::new()
                .name("malloc-trim".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        // SAFETY: malloc_trim only takes the arenas' own locks.
                        unsafe { libc::malloc_trim(0) };
                    }
                });
        }
    }
}
