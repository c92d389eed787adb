//! AFL target: see `rtc_leave_bridge::fuzzing::server_name`.
fn main() {
    afl::fuzz!(|data: &[u8]| rtc_leave_bridge::fuzzing::server_name(data));
}
