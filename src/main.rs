//! The `rtc-leave-bridge` binary: see [`rtc_leave_bridge::cli`].

use std::process::ExitCode;

/// mimalloc rather than the C library's allocator. A tracked webhook costs the bridge ~45
/// allocations (decoding, routing, the member's state machine, the commit, the log line) on
/// several threads (the handler's, the engine's, SQLite's): under glibc, whose two arenas those
/// threads share, allocating took 12 % of its CPU time, lock waits included. mimalloc's
/// per-thread heaps took 2.5–6 µs off the ~33 µs of CPU a tracked webhook costs, and its blocks
/// carry no header: a tracked member costs ~100 bytes less at 100k (README, "Measured
/// performance"). The same allocator on every target, the container image's musl build included.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    limit_malloc_arenas();
    raise_file_limit();
    rtc_leave_bridge::cli::run()
}

/// What still allocates through glibc (SQLite's C code, on its own threads) need not spread over
/// an arena per thread (up to 8 per core), each keeping freed memory resident: two are plenty.
/// (musl, in the container image, has no arenas.)
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Lets the process hold as many connections as its hard limit allows (the soft limit is often
/// 1024): `RTC_LEAVE_BRIDGE_MAX_CONNECTIONS`, not the soft limit, decides how many clients are
/// served at once, and slow clients cannot run the service out of file descriptors first.
fn raise_file_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct passed; called before any
    // other thread exists.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
