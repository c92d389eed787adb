//! Today's Element Call, in a real browser, through the whole stack: Element Call's embedded build
//! served standalone with the operator's `config.json` (`deploy/element-call/config.json`: the
//! delayed leave it hands over set to a minute, restarted by Element Call itself every 20 s, so
//! that only the bridge can remove a membership quickly),
//! Debian's Chromium with fake media devices, a real Synapse, a real LiveKit server, and the built
//! bridge as the MatrixRTC backend. Users do what users do — join, close the tab, hang up, have
//! their browser killed or their network cut — and every outcome is judged in Synapse's room state
//! and at the recording proxy between the bridge and Synapse (who removed a membership, when).

mod common;

use std::time::{Duration, Instant};

use common::element_call::{self, MEMBER, Stack, User};
use common::participant::NetworkCut;

/// The user id the browser whose network is cut runs as (the real-LiveKit tests use 65 533–4).
const CUT_UID: u32 = 65_532;

/// One browser: its membership is set when it joins, LiveKit lists it with published tracks,
/// and it stays; closing the tab removes it within two seconds, by the bridge's send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_in_a_call_stays_and_its_closed_tab_leaves_within_two_seconds() {
    let w = Stack::start("compatibility").await;
    let (mut alice, room) = w.start_call("Alice", None).await;
    println!("Element Call {}: {} in {room}", element_call::version(), alice.identity);
    let joined = w.webhooks.first("participant_joined", Some(&alice.identity)).unwrap();
    let lk_room = joined.body["room"]["name"].as_str().unwrap().to_owned();
    let listed = common::livekit::room_service(&w.livekit.http_url).list_participants(&lk_room).await.unwrap();
    assert_eq!(listed.iter().map(|p| p.identity.as_str()).collect::<Vec<_>>(), [alice.identity.as_str()]);
    let published = w.webhooks.wait_for("track_published", Some(&alice.identity), Duration::from_secs(10)).await;
    assert!(published.is_some(), "no track published by {}", alice.identity);
    w.all_stay(&room, &[&alice], Duration::from_secs(6), "in the call").await;

    let closing = Instant::now();
    alice.browser.close_tab().await;
    let gone = w.wait_member(&room, &alice.browser.user_id, false, Duration::from_secs(10)).await;
    let gone = gone.unwrap_or_else(|| panic!("still a member after its tab closed\n{}", w.bridge.logs()));
    let send = w.wait_accepted_send(&alice, Duration::from_secs(2)).await;
    let send = send.unwrap_or_else(|| panic!("removed, but not by the bridge: {:?}", w.hs.calls()));
    let left = w.webhooks.first("participant_left", Some(&alice.identity)).unwrap();
    println!(
        "tab closed -> LiveKit's participant_left {:?}, the bridge's send answered {:?}, membership gone {:?}",
        left.received - closing,
        send.after(closing),
        gone - closing
    );
    assert!(gone - closing < Duration::from_secs(2), "gone {:?} after the tab closed", gone - closing);
}

/// Two browsers in one call: each publishes and receives the other's media, both memberships
/// stay; then the bridge is killed -9 and restarted mid-call: nobody's membership is removed, and
/// a tab closed after it still leaves fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_see_each_other_and_survive_a_bridge_restart() {
    let mut w = Stack::start("compatibility").await;
    let (alice, room) = w.start_call("Alice", None).await;
    let link = alice.browser.call_url.clone();
    let mut bob = w.join("Bob", Some(&link), None, &[&alice]).await;
    let mut alice = alice;
    for u in [&alice, &bob] {
        assert!(w.wait_member(&room, &u.browser.user_id, true, Duration::from_secs(10)).await.is_some());
        let published = w.webhooks.wait_for("track_published", Some(&u.identity), Duration::from_secs(10)).await;
        assert!(published.is_some(), "no track published by {}", u.identity);
    }
    // Each sees two tiles, and two videos playing: its own camera and the other's, received.
    for u in [&mut alice, &mut bob] {
        let ((tiles, videos, playing), shown) =
            u.browser.wait_media(Duration::from_secs(20), |tiles, _, playing| tiles == 2 && playing >= 2).await;
        assert!(shown, "{}: {tiles} tiles, {playing} of {videos} videos playing", u.identity);
    }
    w.all_stay(&room, &[&alice, &bob], Duration::from_secs(4), "both in the call").await;

    w.bridge.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.bridge.restart().await;
    w.all_stay(&room, &[&alice, &bob], Duration::from_secs(8), "after the bridge's kill -9 and restart").await;

    let closing = Instant::now();
    bob.browser.close_tab().await;
    let gone = w.wait_member(&room, &bob.browser.user_id, false, Duration::from_secs(10)).await.unwrap();
    assert!(w.wait_accepted_send(&bob, Duration::from_secs(2)).await.is_some(), "removed, but not by the bridge");
    println!("after the bridge's restart: tab closed -> membership gone {:?}", gone - closing);
    assert!(gone - closing < Duration::from_secs(2), "gone {:?} after the tab closed", gone - closing);
    w.all_stay(&room, &[&alice], Duration::from_secs(2), "the other one").await;
}

/// A browser killed -9: no word to anyone; LiveKit notices the silence (its ping timeout), and
/// the membership goes as soon as it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_browser_is_removed_as_soon_as_livekit_reports_it_gone() {
    let w = Stack::start("compatibility").await;
    let (mut alice, room) = w.start_call("Alice", None).await;
    let killed = Instant::now();
    alice.browser.kill9();
    removed_when_livekit_says(&w, &alice, &room, killed, "kill -9").await;
}

/// A browser whose network is cut (every packet it sends dropped): the same as a kill, for
/// LiveKit and so for the bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_loses_its_network_is_removed_when_livekit_reports_it_gone() {
    let w = Stack::start("compatibility").await;
    let (alice, room) = w.start_call("Alice", Some(CUT_UID)).await;
    let cut_at = Instant::now();
    let cut = NetworkCut::start(CUT_UID);
    removed_when_livekit_says(&w, &alice, &room, cut_at, "network cut").await;
    drop(cut);
}

/// Kept while LiveKit still has the session, removed by the bridge's send as soon as LiveKit
/// reports it gone.
async fn removed_when_livekit_says(w: &Stack, user: &User, room: &str, since: Instant, what: &str) {
    let left = w.webhooks.wait_for("participant_left", Some(&user.identity), Duration::from_secs(45)).await;
    let left = left.unwrap_or_else(|| panic!("LiveKit never reported the {what} ({})", user.identity));
    assert!(
        w.calls_of(user).iter().filter(|c| c.action.as_deref() == Some("send")).all(|c| c.received >= left.received),
        "the leave was sent before LiveKit said the session was gone"
    );
    let gone = w.wait_member(room, &user.browser.user_id, false, Duration::from_secs(5)).await;
    let gone = gone.unwrap_or_else(|| panic!("still a member after LiveKit reported it gone\n{}", w.bridge.logs()));
    // (The proxy records Synapse's answer a moment after Synapse applied the send.)
    let send = w.wait_accepted_send(user, Duration::from_secs(2)).await;
    let send =
        send.unwrap_or_else(|| panic!("removed, not by the bridge's send: {:?}\n{}", w.hs.calls(), w.bridge.logs()));
    println!(
        "{what}: LiveKit's participant_left ({}) after {:?}; the bridge's send answered {:?} after it; membership gone {:?} after it",
        left.reason.as_deref().unwrap_or("?"),
        left.received - since,
        send.after(left.received),
        gone - left.received
    );
    assert!(send.after(left.received) < Duration::from_secs(1));
}

/// Element Call's own hang-up button: Element Call sends its delayed leave itself as it
/// disconnects from LiveKit, and LiveKit's report of the departure has the bridge send the same
/// delayed event: the two race (Synapse sends a delayed event once: the other gets a 404). The
/// bridge ends quietly whichever lands first: one send, no retry, no warning. If Element Call's
/// landed first, the room's state changes once; if the bridge's did, Element Call, answered 404,
/// writes its leave itself as well (matrix-js-sdk's fallback): once more, by the client, and the
/// member stays gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_calls_own_hang_up_removes_the_member_and_the_bridge_ends_quietly() {
    let w = Stack::start("compatibility").await;
    let (mut alice, room) = w.start_call("Alice", None).await;
    let user_id = alice.browser.user_id.clone();
    let memberships = |state: Vec<serde_json::Value>| {
        state
            .into_iter()
            .filter(|e| e["type"] == MEMBER && e["sender"] == user_id.as_str())
            .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    let before = memberships(w.synapse.room_state(&w.observer, &room).await);
    let hanging_up = Instant::now();
    alice.browser.hang_up().await;
    let gone = w.wait_member(&room, &alice.browser.user_id, false, Duration::from_secs(10)).await;
    let gone = gone.unwrap_or_else(|| panic!("still a member after hanging up\n{}", w.bridge.logs()));
    let left = w.webhooks.wait_for("participant_left", Some(&alice.identity), Duration::from_secs(10)).await;
    assert!(left.is_some(), "LiveKit never reported the hang-up");
    let done = common::eventually(Duration::from_secs(5), || async { w.bridge.jobs_tracked().await == 0.0 }).await;
    assert!(done, "the bridge still tracks the member\n{}", w.bridge.logs());
    let ended = memberships(w.synapse.room_state(&w.observer, &room).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = memberships(w.synapse.room_state(&w.observer, &room).await);
    assert_ne!(ended, before, "the hang-up changed nothing");
    let sends: Vec<Option<u16>> =
        w.calls_of(&alice).iter().filter(|c| c.action.as_deref() == Some("send")).map(|c| c.status).collect();
    let who = if sends == [Some(404)] { "Element Call's own" } else { "the bridge's" };
    println!("hang-up -> membership gone {:?}; the leave that landed: {who}", gone - hanging_up);
    assert!(sends == [Some(200)] || sends == [Some(404)], "the bridge's sends: {sends:?}");
    if sends == [Some(404)] {
        assert_eq!(ended, later, "the room's state changed again after Element Call's own leave");
    }
    let still_gone = w.wait_member(&room, &alice.browser.user_id, false, Duration::from_secs(1)).await;
    assert!(still_gone.is_some(), "a member again after the hang-up");
    let logs = w.bridge.logs();
    let loud: Vec<&str> = logs.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    assert!(loud.is_empty(), "the bridge complained about an ordinary hang-up: {loud:#?}");
}

/// Element Call's `matrix_2_0` mode: its token comes from `/get_token`, its membership is a
/// sticky event (not room state), and its delayed leave is handed over in the token request.
/// LiveKit accepts the token; closing the tab has the bridge send that leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_2_0_mode_gets_a_working_token_and_a_closed_tab_is_left_by_the_bridge() {
    let w = Stack::start("matrix_2_0").await;
    let mut alice = w.join("Alice", None, None, &[]).await;
    let published = w.webhooks.wait_for("track_published", Some(&alice.identity), Duration::from_secs(10)).await;
    assert!(published.is_some(), "no track published by {}", alice.identity);
    // Settled, as a user is by the time they close a call: its own video playing, two seconds
    // in. (Closed the moment its track was published, a tab once left without livekit-client's
    // goodbye, and LiveKit noticed only after its ~20 s timeout.)
    let (_, playing) = alice.browser.wait_media(Duration::from_secs(10), |_, _, playing| playing > 0).await;
    assert!(playing, "{}'s own video never played", alice.identity);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closing = Instant::now();
    alice.browser.close_tab().await;
    let send = w.wait_accepted_send(&alice, Duration::from_secs(5)).await;
    let send = send.unwrap_or_else(|| {
        let left = w.webhooks.first("participant_left", Some(&alice.identity)).is_some();
        panic!(
            "no leave sent by the bridge (LiveKit reported the departure: {left}): {:?}\n{}",
            w.hs.calls(),
            w.bridge.logs()
        )
    });
    println!("matrix_2_0: tab closed -> the bridge's send answered {:?}", send.after(closing));
    assert!(send.after(closing) < Duration::from_secs(2));
}
