//! The `rtc-leave-bridge` binary: see [`rtc_leave_bridge::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_arenas();
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
