//! The `rtc-leave-bridge` binary: see [`rtc_leave_bridge::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_arenas();
    raise_file_limit();
    rtc_leave_bridge::cli::run()
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed in
/// one arena is not reused by another: a burst handled on many threads (a wave of delegations,
/// the blocking pool) leaves resident memory behind in each. Two arenas are plenty for a service
/// whose state lives in one task. (musl, in the container image, has no arenas.)
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
