//! The bridge next to a **real LiveKit server** (`livekit-server` v1.13.5 with the shipped
//! `deploy/livekit.yaml`) and **real participants** (LiveKit's own client library, one process
//! each), with a real Synapse: tokens minted by the bridge are accepted by the server, webhooks
//! are LiveKit's own, and every leave is judged at the homeserver (the recording proxy) and in
//! room state. The time LiveKit takes to report a departure is measured apart from the bridge's.

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Bridge, SLOT};
use common::hs_proxy::HsProxy;
use common::livekit_server::LiveKitServer;
use common::participant::{NetworkCut, Participant};
use common::synapse::{MatrixUser, Synapse, SynapseOptions};
use common::webhook_proxy::WebhookProxy;
use rtc_leave_bridge::identity;
use serde_json::{Value, json};

/// Long enough for three instances' failover (lease × 1.25 + 2 s), short enough for quick tests.
const DELAY_MS: u64 = 4_000;
/// The shard lease of the three instances on Redis.
const LEASE: Duration = Duration::from_secs(1);
/// Every network-cut participant runs as a user id of its own (one per store, as the two
/// variants of a scenario may run at once).
const fn cut_uid(store: Store) -> u32 {
    match store {
        Store::Sqlite => 65_534,
        Store::Redis => 65_533,
    }
}

/// Where the bridge keeps its state: one instance on the embedded SQLite, or three instances on
/// one Redis behind one webhook address (LiveKit's webhooks spread over them, each request to the
/// next instance in turn). Every scenario runs on both.
#[derive(Clone, Copy, Debug)]
enum Store {
    Sqlite,
    Redis,
}

/// Runs each scenario once per store, as `sqlite::<name>` and `redis::<name>`.
macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Store::Sqlite).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Store::Redis).await
                }
            )*
        }
    };
}

on_each_store!(
    a_connected_member_is_kept_and_a_hang_up_removes_it_at_once,
    a_killed_client_is_removed_as_soon_as_livekit_reports_it_gone,
    the_server_accepts_our_tokens_and_only_full_access_users_open_rooms,
    a_frozen_client_is_kept_until_livekit_gives_up_on_it,
    a_duplicate_identity_keeps_the_member,
    reconciliation_removes_members_of_a_livekit_that_died,
    room_finished_after_the_last_departure_sends_nothing_twice,
    a_client_that_loses_its_network_is_removed_when_livekit_reports_it_gone,
    reconciliation_finds_departures_whose_webhooks_were_lost,
);

struct World {
    store: Store,
    synapse: Synapse,
    hs: HsProxy,
    livekit: LiveKitServer,
    webhooks: WebhookProxy,
    bridges: Vec<Bridge>,
    _redis: Option<common::redis::Redis>,
    /// The instance the next request goes to.
    next: std::sync::atomic::AtomicUsize,
    alice: MatrixUser,
    room: String,
    lk_room: String,
    http: reqwest::Client,
}

impl World {
    async fn with(store: Store, env: &[(&str, &str)]) -> World {
        let synapse = Synapse::start(SynapseOptions::default()).await;
        let hs = HsProxy::start(&synapse.url).await;
        let redis = match store {
            Store::Sqlite => None,
            Store::Redis => Some(common::redis::Redis::start().await),
        };
        let instances = if redis.is_some() { 3 } else { 1 };
        let ports: Vec<u16> = (0..instances).map(|_| common::free_port()).collect();
        let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let webhooks = WebhookProxy::start_many(&urls).await;
        let livekit = LiveKitServer::start(std::slice::from_ref(&webhooks.url)).await;
        let mut bridges = Vec::new();
        for (i, port) in ports.into_iter().enumerate() {
            let mut bridge_env = match &redis {
                None => Bridge::env_for_url(&hs.url, &livekit.url),
                Some(r) => Bridge::env_for_cluster_url(&hs.url, &livekit.url, &r.url(), LEASE, &format!("rl{i}")),
            };
            for (k, v) in env {
                bridge_env.insert((*k).into(), (*v).into());
            }
            bridges.push(Bridge::start_on(port, bridge_env).await);
        }
        let alice = synapse.register("alice").await;
        let room = synapse.create_room(&alice).await;
        let lk_room = identity::livekit_room(&room, SLOT);
        World {
            store,
            synapse,
            hs,
            livekit,
            webhooks,
            bridges,
            _redis: redis,
            next: Default::default(),
            alice,
            room,
            lk_room,
            http: reqwest::Client::new(),
        }
    }

    /// Posts to the next instance.
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.bridges.len();
        let resp = self.http.post(format!("{}{path}", self.bridges[i].url)).json(body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Every instance's log.
    fn logs(&self) -> String {
        self.bridges.iter().map(Bridge::logs).collect::<Vec<_>>().join("\n---- next instance ----\n")
    }

    /// Jobs tracked, over all instances.
    async fn jobs_tracked(&self) -> f64 {
        let mut n = 0.0;
        for b in &self.bridges {
            n += b.jobs_tracked().await;
        }
        n
    }

    /// Every instance killed -9: the service is down.
    fn kill_bridges(&mut self) {
        self.bridges.iter_mut().for_each(Bridge::kill9);
    }

    async fn restart_bridges(&mut self) {
        for b in &mut self.bridges {
            b.restart().await;
        }
    }

    /// `user` joins the call as Element Call does in its compatibility mode: a token first
    /// (`/sfu/get`), then its membership with a delayed leave, then a token again with the
    /// delayed leave handed over; connects with that token. Returns the delay id and the
    /// participant.
    async fn joins_call(&self, user: &MatrixUser) -> (String, Participant) {
        self.joins_call_with(user, DELAY_MS, None).await
    }

    /// As [`World::joins_call`], with a delayed leave of `delay_ms`, the participant's process
    /// run as user id `uid` if given (see [`NetworkCut`]).
    async fn joins_call_with(&self, user: &MatrixUser, delay_ms: u64, uid: Option<u32>) -> (String, Participant) {
        let mut body = json!({
            "room": self.room,
            "openid_token": self.synapse.openid_token(user).await,
            "device_id": user.device_id,
        });
        let (status, answer) = self.post("/sfu/get", &body).await;
        assert_eq!(status, 200, "{answer}\n{}", self.logs());
        let delay_id = self.synapse.join_call(user, &self.room, delay_ms).await;
        body["openid_token"] = self.synapse.openid_token(user).await;
        body["delay_id"] = json!(delay_id);
        body["delay_timeout"] = json!(delay_ms);
        body["delay_cs_api_url"] = json!("https://matrix.example.org");
        let (status, answer) = self.post("/sfu/get", &body).await;
        assert_eq!(status, 200, "{answer}\n{}", self.logs());
        assert_eq!(answer["url"], json!(self.livekit.url));
        let p = Participant::join_as(answer["url"].as_str().unwrap(), answer["jwt"].as_str().unwrap(), uid).await;
        assert_eq!(p.identity, format!("{}:{}", user.user_id, user.device_id));
        (delay_id, p)
    }

    async fn still_member_after(&self, user: &MatrixUser, wait: Duration) -> bool {
        self.synapse.still_member_after(user, &self.room, wait).await
    }

    /// After `fault` to `p` at `since`: waits for LiveKit to report it gone (up to 60 s: LiveKit
    /// takes about 20 s to time a silent client out) and for the bridge's accepted send of
    /// `delay_id`, which must come after LiveKit's report; prints both times. Returns the time from
    /// the report to the homeserver's answer.
    async fn removed_once_livekit_reports(
        &self,
        p: &Participant,
        delay_id: &str,
        fault: &str,
        since: Instant,
    ) -> Duration {
        let left = self.webhooks.wait_for("participant_left", Some(&p.identity), Duration::from_secs(60)).await;
        let left = left.unwrap_or_else(|| panic!("LiveKit reported nothing in 60 s: {:?}", self.webhooks.deliveries()));
        let send =
            self.hs.wait_accepted_send(delay_id, Duration::from_secs(5)).await.expect("the bridge sent the leave");
        // The member was kept until LiveKit said so: no send before the webhook.
        let ours = send.after(left.received);
        println!(
            "real LiveKit ({:?}), {fault}: {} after {:?} (reason {:?}); the leave accepted {ours:?} after it",
            self.store,
            left.event,
            left.received.saturating_duration_since(since),
            left.reason
        );
        ours
    }
}

/// A member who joined through the bridge's token is kept in room state past twice its delay by
/// the bridge's restarts; its clean hang-up removes it within a second, by the bridge's own send.
async fn a_connected_member_is_kept_and_a_hang_up_removes_it_at_once(store: Store) {
    let w = World::with(store, &[]).await;
    let (delay_id, mut p) = w.joins_call(&w.alice).await;
    let joined = w.webhooks.wait_for("participant_joined", Some(&p.identity), Duration::from_secs(10)).await;
    assert!(joined.is_some(), "LiveKit sent no participant_joined: {:?}", w.webhooks.deliveries());
    assert!(w.still_member_after(&w.alice, Duration::from_millis(2 * DELAY_MS + 1_000)).await, "{}", w.logs());
    assert!(w.hs.calls_of(&delay_id, "restart").len() >= 2, "kept alive by the bridge's restarts");

    let hung_up = Instant::now();
    p.hang_up().await;
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(5)).await;
    let send = send.unwrap_or_else(|| panic!("no leave sent; webhooks: {:?}\n{}", w.webhooks.deliveries(), w.logs()));
    assert!(!w.synapse.is_member(&w.alice, &w.room).await);
    let left = w.webhooks.first("participant_left", Some(&p.identity)).expect("LiveKit reported the departure");
    let livekit_took = left.received.saturating_duration_since(hung_up);
    let bridge_took = send.after(left.received);
    println!(
        "real LiveKit ({store:?}), clean hang-up: participant_left after {livekit_took:?} (reason {:?}); the leave accepted {bridge_took:?} later",
        left.reason
    );
    assert!(send.after(hung_up) < Duration::from_secs(1), "{:?}", send.after(hung_up));
}

/// A client killed with SIGKILL says nothing: LiveKit notices on its own, and the leave goes out
/// as soon as it says so. The time LiveKit takes, the event and the reason are reported.
async fn a_killed_client_is_removed_as_soon_as_livekit_reports_it_gone(store: Store) {
    let w = World::with(store, &[("RTC_LEAVE_BRIDGE_RECONCILE_INTERVAL", "1h")]).await;
    let (delay_id, mut p) = w.joins_call(&w.alice).await;
    assert!(w.webhooks.wait_for("participant_joined", Some(&p.identity), Duration::from_secs(10)).await.is_some());
    let killed = Instant::now();
    p.kill9();
    let ours = w.removed_once_livekit_reports(&p, &delay_id, "kill -9", killed).await;
    assert!(!w.synapse.is_member(&w.alice, &w.room).await);
    assert!(ours < Duration::from_secs(1), "{ours:?}");
}

/// The tokens the bridge mints are accepted by the server itself; a full-access user's room is
/// opened by the bridge with its timeouts (read back through RoomService), and with
/// `room.auto_create: false` a restricted user's token opens nothing.
async fn the_server_accepts_our_tokens_and_only_full_access_users_open_rooms(store: Store) {
    // Matrix 2.0 (`/get_token`): the 3-part hashed identity.
    let w = World::with(store, &[]).await;
    let member_id = format!("{}:{}", w.alice.user_id, w.alice.device_id);
    let body = json!({
        "room_id": w.room, "slot_id": SLOT,
        "openid_token": w.synapse.openid_token(&w.alice).await,
        "member": {"id": member_id, "claimed_user_id": w.alice.user_id, "claimed_device_id": w.alice.device_id},
    });
    let (status, answer) = w.post("/get_token", &body).await;
    assert_eq!(status, 200, "{answer}");
    let p = Participant::join(answer["url"].as_str().unwrap(), answer["jwt"].as_str().unwrap()).await;
    assert_eq!(p.identity, identity::identity_three_part(&w.alice.user_id, &w.alice.device_id, &member_id));
    // The room, as LiveKit has it: ours, with the bridge's timeouts.
    let listed = common::livekit::room_service(&w.livekit.http_url).list_participants(&w.lk_room).await.unwrap();
    assert_eq!(listed.iter().map(|p| p.identity.as_str()).collect::<Vec<_>>(), [p.identity.as_str()]);
    let room = list_room(&w.livekit.http_url, &w.lk_room).await.expect("the room exists");
    assert_eq!((room.empty_timeout, room.departure_timeout), (300, 20), "the bridge's room timeouts");
    drop(p);

    // A user of a homeserver without full access: a token, but no room is opened for it.
    let restricted = World::with(store, &[("LIVEKIT_FULL_ACCESS_HOMESERVERS", "elsewhere.test")]).await;
    let body = json!({
        "room": restricted.room,
        "openid_token": restricted.synapse.openid_token(&restricted.alice).await,
        "device_id": restricted.alice.device_id,
    });
    let (status, answer) = restricted.post("/sfu/get", &body).await;
    assert_eq!(status, 200, "{answer}");
    let joined = Participant::try_join_as(answer["url"].as_str().unwrap(), answer["jwt"].as_str().unwrap(), None).await;
    let Err(said) = joined else { panic!("a restricted user's token opened a room") };
    assert!(said.iter().any(|e| e["event"] == "error"), "refused without an error: {said:?}");
}

/// Room `name` as LiveKit's RoomService lists it (`ListRooms`, Twirp protobuf).
async fn list_room(http_url: &str, name: &str) -> Option<livekit_protocol::Room> {
    use prost::Message as _;
    let grants = livekit_api::access_token::VideoGrants { room_list: true, ..Default::default() };
    let token =
        livekit_api::access_token::AccessToken::with_api_key(common::livekit::API_KEY, common::livekit::API_SECRET)
            .with_grants(grants)
            .to_jwt()
            .unwrap();
    let request = livekit_protocol::ListRoomsRequest { names: vec![name.to_owned()] };
    let resp = reqwest::Client::new()
        .post(format!("{http_url}/twirp/livekit.RoomService/ListRooms"))
        .bearer_auth(token)
        .header("content-type", "application/protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "ListRooms: {}", resp.status());
    let list = livekit_protocol::ListRoomsResponse::decode(resp.bytes().await.unwrap()).unwrap();
    list.rooms.into_iter().find(|r| r.name == name)
}

/// A client frozen (SIGSTOP) for less than LiveKit's timeout, then resumed, is never removed; frozen
/// for longer, it is removed as soon as LiveKit gives up on it (measured).
async fn a_frozen_client_is_kept_until_livekit_gives_up_on_it(store: Store) {
    let w = World::with(store, &[]).await;
    let (delay_id, p) = w.joins_call(&w.alice).await;
    assert!(w.webhooks.wait_for("participant_joined", Some(&p.identity), Duration::from_secs(10)).await.is_some());
    p.freeze(true);
    assert!(w.still_member_after(&w.alice, Duration::from_secs(6)).await, "removed while frozen for 6 s");
    p.freeze(false);
    assert!(w.still_member_after(&w.alice, Duration::from_millis(2 * DELAY_MS)).await, "removed after resuming");
    assert!(w.hs.accepted_send(&delay_id).is_none(), "a leave was sent for a member still connected");
    assert!(w.webhooks.first("participant_left", Some(&p.identity)).is_none(), "{:?}", w.webhooks.deliveries());

    let frozen = Instant::now();
    p.freeze(true);
    w.removed_once_livekit_reports(&p, &delay_id, "SIGSTOP", frozen).await;
}

/// The same identity joining from a second process (a second tab, a reconnecting client) makes
/// LiveKit drop the first session as a duplicate: the member is kept; its last hang-up removes it,
/// sending once.
async fn a_duplicate_identity_keeps_the_member(store: Store) {
    let w = World::with(store, &[]).await;
    let (delay_id, first) = w.joins_call(&w.alice).await;
    assert!(w.webhooks.wait_for("participant_joined", Some(&first.identity), Duration::from_secs(10)).await.is_some());
    let body =
        json!({"room": w.room, "openid_token": w.synapse.openid_token(&w.alice).await, "device_id": w.alice.device_id});
    let (status, answer) = w.post("/sfu/get", &body).await;
    assert_eq!(status, 200, "{answer}");
    let mut second = Participant::join(answer["url"].as_str().unwrap(), answer["jwt"].as_str().unwrap()).await;
    assert_eq!(second.identity, first.identity);
    let kicked = w.webhooks.wait_for("participant_left", Some(&first.identity), Duration::from_secs(10)).await;
    let kicked = kicked.unwrap_or_else(|| panic!("no departure of the first session: {:?}", w.webhooks.deliveries()));
    println!("real LiveKit ({store:?}), duplicate identity: the first session left with reason {:?}", kicked.reason);
    assert!(w.still_member_after(&w.alice, Duration::from_millis(2 * DELAY_MS + 2_000)).await, "{}", w.logs());
    assert!(w.hs.accepted_send(&delay_id).is_none());
    drop(first);
    let hung_up = Instant::now();
    second.hang_up().await;
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(5)).await.expect("the bridge sent the leave");
    assert!(send.after(hung_up) < Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.hs.calls_of(&delay_id, "send").len(), 1, "sent once");
}

/// LiveKit killed -9 and started again while a member is connected: no webhook will ever say the
/// member is gone (the new server has no such room, and the client cannot rejoin it), so the
/// bridge's reconciliation through the real RoomService removes it — only once its session is
/// absent from every listing.
async fn reconciliation_removes_members_of_a_livekit_that_died(store: Store) {
    let mut w = World::with(store, &[]).await;
    let (delay_id, _p) = w.joins_call(&w.alice).await;
    assert!(w.webhooks.wait_for("participant_joined", Some(&_p.identity), Duration::from_secs(10)).await.is_some());
    let killed = Instant::now();
    w.livekit.kill9();
    // While LiveKit is down, nobody is removed: RoomService cannot be asked.
    assert!(w.still_member_after(&w.alice, Duration::from_secs(4)).await, "removed on a guess while LiveKit was down");
    w.livekit.restart().await;
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(30)).await;
    let send = send.unwrap_or_else(|| panic!("not removed after LiveKit came back\n{}", w.logs()));
    assert!(!w.synapse.is_member(&w.alice, &w.room).await);
    assert_eq!(w.webhooks.first("participant_left", None).map(|d| d.event), None, "no webhook came");
    println!(
        "real LiveKit ({store:?}) killed -9 and restarted: the member removed by reconciliation {:?} after the kill",
        send.after(killed)
    );
}

/// The last member gone, LiveKit closes the room after its departure timeout (`room_finished`):
/// the leave was sent once, at the departure, and not again.
async fn room_finished_after_the_last_departure_sends_nothing_twice(store: Store) {
    let w = World::with(store, &[("RTC_LEAVE_BRIDGE_ROOM_DEPARTURE_TIMEOUT", "1s")]).await;
    let (delay_id, mut p) = w.joins_call(&w.alice).await;
    assert!(w.webhooks.wait_for("participant_joined", Some(&p.identity), Duration::from_secs(10)).await.is_some());
    p.hang_up().await;
    assert!(w.hs.wait_accepted_send(&delay_id, Duration::from_secs(5)).await.is_some());
    let finished = w.webhooks.wait_for("room_finished", None, Duration::from_secs(30)).await;
    assert!(finished.is_some(), "no room_finished: {:?}", w.webhooks.deliveries());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.hs.calls_of(&delay_id, "send").len(), 1, "sent once");
    assert_eq!(w.jobs_tracked().await, 0.0);
}

/// A client whose network goes away for a few seconds and comes back (it reconnects, or LiveKit
/// never noticed) is never removed; one whose network stays away (every packet it sends dropped,
/// whatever port it tries) is removed as soon as LiveKit reports it gone (measured), not before.
async fn a_client_that_loses_its_network_is_removed_when_livekit_reports_it_gone(store: Store) {
    let uid = cut_uid(store);
    let w = World::with(store, &[]).await;
    let (delay_id, p) = w.joins_call_with(&w.alice, DELAY_MS, Some(uid)).await;
    assert!(w.webhooks.wait_for("participant_joined", Some(&p.identity), Duration::from_secs(10)).await.is_some());
    let brief = NetworkCut::start(uid);
    assert!(w.still_member_after(&w.alice, Duration::from_secs(5)).await, "removed during a 5 s network cut");
    drop(brief);
    assert!(
        w.still_member_after(&w.alice, Duration::from_millis(2 * DELAY_MS)).await,
        "removed after the network came back"
    );
    assert!(w.hs.accepted_send(&delay_id).is_none(), "a leave was sent for a member still connected");
    let events: Vec<String> = w.webhooks.deliveries().into_iter().map(|d| d.event).collect();
    println!("real LiveKit ({store:?}), 5 s network cut then back: webhooks {events:?}");

    let cut_at = Instant::now();
    let _cut = NetworkCut::start(uid);
    w.removed_once_livekit_reports(&p, &delay_id, "network cut", cut_at).await;
}

/// Three instances on Redis: a member connected through a real LiveKit is kept while each
/// instance in turn is killed -9 and restarted a delay later, and its hang-up removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_redis_keep_a_member_through_kills_and_remove_it_on_hang_up() {
    let mut w = World::with(Store::Redis, &[]).await;
    let (delay_id, mut p) = w.joins_call(&w.alice).await;
    assert!(w.webhooks.wait_for("participant_joined", Some(&p.identity), Duration::from_secs(10)).await.is_some());
    for i in 0..w.bridges.len() {
        w.bridges[i].kill9();
        let until = Instant::now() + Duration::from_millis(DELAY_MS);
        while Instant::now() < until {
            assert!(w.synapse.is_member(&w.alice, &w.room).await, "removed while connected\n{}", w.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        w.bridges[i].restart().await;
    }
    assert!(w.hs.accepted_send(&delay_id).is_none());
    let hung_up = Instant::now();
    p.hang_up().await;
    let send = w.hs.wait_accepted_send(&delay_id, Duration::from_secs(5)).await.expect("the bridge sent the leave");
    assert!(!w.synapse.is_member(&w.alice, &w.room).await);
    let took = send.after(hung_up);
    println!("real LiveKit, three instances on Redis, each killed in turn: hang-up → leave accepted after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// Webhooks lost: a member's departure whose webhooks never reach the bridge (all dropped) is
/// found by periodic reconciliation through the real RoomService; one who leaves while the bridge
/// is down is removed once it is back (by LiveKit's retry of the webhook if one still comes, else
/// by the reconciliation at start), well before its own timer.
async fn reconciliation_finds_departures_whose_webhooks_were_lost(store: Store) {
    let mut w = World::with(store, &[]).await;
    let bob = w.synapse.register("bob").await;
    w.synapse.join_room(&bob, &w.room).await;
    let (alice_delay, mut alice) = w.joins_call(&w.alice).await;
    // Bob's delay outlasts the bridge's downtime below: only the bridge can remove him early.
    let (bob_delay, mut bob_p) = w.joins_call_with(&bob, 20_000, None).await;
    for p in [&alice, &bob_p] {
        assert!(w.webhooks.wait_for("participant_joined", Some(&p.identity), Duration::from_secs(10)).await.is_some());
    }
    // Every webhook lost from now on; Alice hangs up.
    w.webhooks.lose_every(1);
    let hung_up = Instant::now();
    alice.hang_up().await;
    let send = w.hs.wait_accepted_send(&alice_delay, Duration::from_secs(30)).await;
    let send = send.unwrap_or_else(|| panic!("not found by reconciliation\n{}", w.logs()));
    println!(
        "real LiveKit ({store:?}), departure webhooks lost: found by reconciliation, leave accepted after {:?}",
        send.after(hung_up)
    );
    assert!(w.synapse.is_member(&bob, &w.room).await, "Bob, still connected, was removed");
    w.webhooks.lose_every(0);

    // The bridge down while Bob hangs up: LiveKit's webhook has nowhere to go.
    w.kill_bridges();
    bob_p.hang_up().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(w.hs.accepted_send(&bob_delay).is_none());
    let restarted = Instant::now();
    w.restart_bridges().await;
    let send = w.hs.wait_accepted_send(&bob_delay, Duration::from_secs(15)).await;
    let send = send.unwrap_or_else(|| panic!("not found at start\n{}", w.logs()));
    let retried = w.webhooks.deliveries().into_iter().any(|d| {
        d.event == "participant_left" && d.identity.as_deref() == Some(&bob_p.identity) && d.status == Some(200)
    });
    println!(
        "real LiveKit ({store:?}), departure while the bridge was down: leave accepted {:?} after its start ({})",
        send.after(restarted),
        if retried { "LiveKit's retry of the webhook reached it" } else { "found by reconciliation" }
    );
    assert!(!w.synapse.is_member(&bob, &w.room).await);
}
