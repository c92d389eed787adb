//! AFL target: see `rtc_leave_bridge::fuzzing::config`.
fn main() {
    afl::fuzz!(|data: &[u8]| rtc_leave_bridge::fuzzing::config(data));
}
