//! AFL target: see `rtc_leave_bridge::fuzzing::appservice_request`.
fn main() {
    afl::fuzz!(|data: &[u8]| rtc_leave_bridge::fuzzing::appservice_request(data));
}
