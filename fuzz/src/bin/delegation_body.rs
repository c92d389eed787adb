//! AFL target: see `rtc_leave_bridge::fuzzing::delegation_body`.
fn main() {
    afl::fuzz!(|data: &[u8]| rtc_leave_bridge::fuzzing::delegation_body(data));
}
