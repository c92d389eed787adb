//! AFL target: see `rtc_leave_bridge::fuzzing::webhook_signed`.
fn main() {
    afl::fuzz!(|data: &[u8]| rtc_leave_bridge::fuzzing::webhook_signed(data));
}
