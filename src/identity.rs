//! How a Matrix call member maps onto LiveKit: the room name and every participant identity the
//! member may connect under. These are the hashes lk-jwt-service uses when it mints LiveKit tokens;
//! they must match byte for byte or a delegation would never see its member join.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use sha2::{Digest, Sha256};

/// `sha256(json(parts))` of a compact JSON array of strings.
fn digest_parts(parts: &[&str]) -> [u8; 32] {
    // serde_json never fails on a slice of strings.
    let json = serde_json::to_vec(parts).expect("a string array serialises");
    Sha256::digest(&json).into()
}

/// `sha256` of `parts` as Go's `json.Marshal` writes them, which also escapes `<`, `>`, `&`,
/// U+2028 and U+2029 (`\u003c` …): how lk-jwt-service's Go version hashed identities. `None`
/// when that is the same text as JavaScript's `JSON.stringify` (and serde_json) writes.
fn go_digest_parts(parts: &[&str]) -> Option<[u8; 32]> {
    const ESCAPED: [(char, &str); 5] =
        [('<', "\\u003c"), ('>', "\\u003e"), ('&', "\\u0026"), ('\u{2028}', "\\u2028"), ('\u{2029}', "\\u2029")];
    let js = serde_json::to_string(parts).expect("a string array serialises");
    if !js.contains(|c| ESCAPED.iter().any(|(e, _)| *e == c)) {
        return None;
    }
    // In a JSON array of strings these characters only occur inside strings.
    let mut go = String::with_capacity(js.len() + 16);
    for c in js.chars() {
        match ESCAPED.iter().find(|(e, _)| *e == c) {
            Some((_, escaped)) => go.push_str(escaped),
            None => go.push(c),
        }
    }
    Some(Sha256::digest(go.as_bytes()).into())
}

/// `b64(sha256(json(parts)))`: standard alphabet, no padding.
fn hash_parts(parts: &[&str]) -> String {
    STANDARD_NO_PAD.encode(digest_parts(parts))
}

/// The digest a hashed identity (43 characters of unpadded base64) encodes; `None` for any
/// other identity. Only canonical base64 decodes (no stray trailing bits), so the digest
/// encodes back to the same text.
pub fn hashed_digest(identity: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    (identity.len() == 43 && STANDARD_NO_PAD.decode_slice(identity, &mut digest) == Ok(32)).then_some(digest)
}

/// The text of the hashed identity `digest` encodes (the inverse of [`hashed_digest`]), written
/// into `text`: on the stack, as a job's stored state and log lines spell it.
pub fn hashed_text<'t>(digest: &[u8; 32], text: &'t mut [u8; 43]) -> &'t str {
    let n = STANDARD_NO_PAD.encode_slice(digest, text).expect("32 bytes are 43 characters of base64");
    std::str::from_utf8(&text[..n]).expect("base64 is ASCII")
}

/// Whether `identity` is the legacy `@user:server:DEVICE` of `user_id`'s device `device_id`.
fn is_legacy_of(identity: &str, user_id: &str, device_id: &str) -> bool {
    !device_id.is_empty() && identity.strip_prefix(user_id).and_then(|rest| rest.strip_prefix(':')) == Some(device_id)
}

/// The LiveKit room a MatrixRTC slot of a Matrix room is hosted in.
pub fn livekit_room(room_id: &str, slot_id: &str) -> String {
    hash_parts(&[room_id, slot_id])
}

/// Identity minted by the OpenID `/get_token` endpoint: user, device and member id.
pub fn identity_three_part(user_id: &str, device_id: &str, member_id: &str) -> String {
    hash_parts(&[user_id, device_id, member_id])
}

/// Identity minted by the newer homeserver-proxied (appservice) endpoints: user and member id.
pub fn identity_two_part(user_id: &str, member_id: &str) -> String {
    hash_parts(&[user_id, member_id])
}

/// Identity minted by the legacy `/sfu/get` endpoint: the raw `@user:server:DEVICE`.
pub fn identity_legacy(user_id: &str, device_id: &str) -> String {
    format!("{user_id}:{device_id}")
}

/// Every identity a member may appear under, most specific first, without duplicates.
pub fn member_identities(user_id: &str, device_id: &str, member_id: &str) -> Vec<String> {
    let mut all = vec![
        identity_three_part(user_id, device_id, member_id),
        identity_two_part(user_id, member_id),
        identity_legacy(user_id, device_id),
    ];
    all.dedup();
    all
}

/// The identities a job watches for its member, kept compactly for matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// Whatever the member's client may have been given a token for, by any service: the two
    /// hashed forms as their raw digests (64 bytes, no allocation) and the legacy form, which is
    /// the member's user and device ids (the caller has them).
    Member {
        /// The 3-part digest; `None` without a device id.
        three: Option<[u8; 32]>,
        two: [u8; 32],
        /// The same hashed the way lk-jwt-service's Go version did, when that differs (ids with
        /// `<`, `>`, `&`, U+2028 or U+2029): the member may hold a token it minted.
        go: Option<Box<[Option<[u8; 32]>; 2]>>,
    },
    /// Exactly the identity this service minted for the member with its token.
    Exact(Box<str>),
}

impl Watch {
    pub fn new(user_id: &str, device_id: &str, member_id: &str) -> Self {
        let three = (!device_id.is_empty()).then(|| digest_parts(&[user_id, device_id, member_id]));
        let go_three = if device_id.is_empty() { None } else { go_digest_parts(&[user_id, device_id, member_id]) };
        let go_two = go_digest_parts(&[user_id, member_id]);
        let go = (go_three.is_some() || go_two.is_some()).then(|| Box::new([go_three, go_two]));
        Watch::Member { three, two: digest_parts(&[user_id, member_id]), go }
    }

    /// Every identity the member may connect under, most specific first (the strings of
    /// [`member_identities`], without re-hashing).
    pub fn identities(&self, user_id: &str, device_id: &str) -> Vec<String> {
        match self {
            Watch::Member { three, two, go } => {
                let go_forms = go.iter().flat_map(|g| g.iter().flatten());
                let mut all: Vec<String> =
                    three.iter().chain([two]).chain(go_forms).map(|d| STANDARD_NO_PAD.encode(d)).collect();
                if !device_id.is_empty() {
                    all.push(identity_legacy(user_id, device_id));
                }
                all
            }
            Watch::Exact(identity) => vec![identity.to_string()],
        }
    }

    /// What a job keeps of this to check the hits of its identity index.
    pub fn matcher(&self) -> Matcher {
        match self {
            Watch::Member { three, two, go } => {
                Matcher::Member { three: three.as_ref().map(prefix), two: prefix(two), go: go.clone() }
            }
            Watch::Exact(_) => Matcher::Exact,
        }
    }

    /// Whether `identity` is one the member may connect under: the whole watch, the reference
    /// the [`Matcher`] a job keeps is tested against.
    #[cfg(test)]
    pub fn matches(&self, identity: &str, user_id: &str, device_id: &str) -> bool {
        let (three, two, go) = match self {
            Watch::Member { three, two, go } => (three, two, go),
            Watch::Exact(exact) => return **exact == *identity,
        };
        match hashed_digest(identity) {
            Some(d) => d == *two || Some(d) == *three || go.as_ref().is_some_and(|g| g.contains(&Some(d))),
            None => is_legacy_of(identity, user_id, device_id),
        }
    }
}

/// The first 8 bytes of a digest.
fn prefix(digest: &[u8; 32]) -> u64 {
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// What a job keeps of its [`Watch`] to check that a hit of the engine's identity index (a keyed
/// 64-bit hash of room and identity) is its member: 32 bytes where the watch takes 80, for
/// every tracked member. Of the hashed forms only the first 8 bytes of each digest are kept: a
/// false match would need an identity LiveKit placed in the same room whose SHA-256 shares
/// them, behind the index's own keyed hash. (The Go forms, rare, stay whole.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    Member {
        three: Option<u64>,
        two: u64,
        go: Option<Box<[Option<[u8; 32]>; 2]>>,
    },
    /// The identity minted with the member's token, which the caller keeps.
    Exact,
}

impl Matcher {
    /// Whether `identity` is one the member may connect under; `minted` is the identity of an
    /// exact watch.
    pub fn matches(&self, identity: &str, user_id: &str, device_id: &str, minted: Option<&str>) -> bool {
        let (three, two, go) = match self {
            Matcher::Member { three, two, go } => (three, two, go),
            Matcher::Exact => return minted == Some(identity),
        };
        match hashed_digest(identity) {
            Some(d) => {
                let p = prefix(&d);
                p == *two || Some(p) == *three || go.as_ref().is_some_and(|g| g.contains(&Some(d)))
            }
            None => is_legacy_of(identity, user_id, device_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matcher a job keeps answers as the whole watch does, for every form and none other.
    #[test]
    fn a_matcher_agrees_with_its_watch() {
        let forms = |user: &str, device: &str, member: &str| {
            let mut all = member_identities(user, device, member);
            all.extend(Watch::new(user, device, member).identities(user, device));
            all.push(identity_legacy(user, device));
            all
        };
        let members = [
            ("@alice:example.com", "DEVICE123", "memberABC"),
            ("@alice:example.com", "", "m"),
            ("@b:x.org", "D<&>", "m\u{2028}"),
        ];
        for (user, device, member) in members {
            let watch = Watch::new(user, device, member);
            let matcher = watch.matcher();
            for (u, d, m) in members.iter().chain([&("@alice:example.com", "DEVICE124", "memberABC")]) {
                for identity in forms(u, d, m).into_iter().chain(["garbage".into(), format!("{user}:")]) {
                    assert_eq!(
                        matcher.matches(&identity, user, device, None),
                        watch.matches(&identity, user, device),
                        "{identity} for {user} {device} {member}"
                    );
                }
            }
        }
        let minted = identity_legacy("@alice:example.com", "DEVICE123");
        let exact = Watch::Exact(minted.as_str().into()).matcher();
        assert!(exact.matches(&minted, "@alice:example.com", "DEVICE123", Some(&minted)));
        assert!(!exact.matches(&minted, "@alice:example.com", "DEVICE123", Some("other")));
        assert!(std::mem::size_of::<Matcher>() <= 32, "{}", std::mem::size_of::<Matcher>());
    }

    #[test]
    fn room_name_matches_the_reference_vector() {
        assert_eq!(livekit_room("!roomid:example.com", "slot1234"), "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc");
    }

    #[test]
    fn three_part_identity_matches_the_reference_vector() {
        assert_eq!(
            identity_three_part("@alice:example.com", "DEVICE123", "memberABC"),
            "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"
        );
    }

    #[test]
    fn a_watch_matches_exactly_the_member_identities() {
        let watch = Watch::new("@alice:example.com", "DEVICE123", "memberABC");
        for identity in member_identities("@alice:example.com", "DEVICE123", "memberABC") {
            assert!(watch.matches(&identity, "@alice:example.com", "DEVICE123"), "{identity}");
        }
        for other in member_identities("@alice:example.com", "DEVICE124", "memberABD") {
            assert!(!watch.matches(&other, "@alice:example.com", "DEVICE123"), "{other}");
        }
        assert!(!watch.matches("@alice:example.com:DEVICE12", "@alice:example.com", "DEVICE123"));
        assert!(!watch.matches("garbage", "@alice:example.com", "DEVICE123"));
        assert_eq!(
            watch.identities("@alice:example.com", "DEVICE123"),
            member_identities("@alice:example.com", "DEVICE123", "memberABC")
        );
        let no_device = Watch::new("@alice:example.com", "", "memberABC");
        assert_eq!(
            no_device.identities("@alice:example.com", ""),
            vec![identity_two_part("@alice:example.com", "memberABC")]
        );
        assert!(no_device.matches(&identity_two_part("@alice:example.com", "memberABC"), "@alice:example.com", ""));
        assert!(!no_device.matches("@alice:example.com:", "@alice:example.com", ""));
    }

    #[test]
    fn ids_that_go_escapes_are_watched_in_both_forms() {
        let (user, device, member) = ("@alice:example.com", "DEV<&>", "m\u{2028}1");
        // What JavaScript's JSON.stringify hashes, and what Go's json.Marshal hashed.
        let js = "[\"@alice:example.com\",\"DEV<&>\",\"m\u{2028}1\"]";
        let go = "[\"@alice:example.com\",\"DEV\\u003c\\u0026\\u003e\",\"m\\u20281\"]";
        let b64 = |text: &str| STANDARD_NO_PAD.encode(Sha256::digest(text.as_bytes()));
        assert_eq!(identity_three_part(user, device, member), b64(js), "minted as clients compute");
        let watch = Watch::new(user, device, member);
        assert!(watch.matches(&b64(js), user, device));
        assert!(watch.matches(&b64(go), user, device), "a token from the Go service is recognised");
        assert!(watch.identities(user, device).contains(&b64(go)));
        // Ordinary ids cost nothing extra.
        assert!(matches!(Watch::new(user, "DEV", "m1"), Watch::Member { go: None, .. }));
    }

    #[test]
    fn an_exact_watch_matches_its_identity_alone() {
        let minted = identity_legacy("@alice:example.com", "DEVICE123");
        let watch = Watch::Exact(minted.as_str().into());
        assert!(watch.matches(&minted, "@alice:example.com", "DEVICE123"));
        for other in member_identities("@alice:example.com", "DEVICE123", "memberABC").into_iter().take(2) {
            assert!(!watch.matches(&other, "@alice:example.com", "DEVICE123"), "{other}");
        }
        assert_eq!(watch.identities("@alice:example.com", "DEVICE123"), vec![minted.clone()]);
    }

    #[test]
    fn identities_are_distinct_and_include_the_legacy_form() {
        let ids = member_identities("@alice:example.com", "DEVICE123", "memberABC");
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[2], "@alice:example.com:DEVICE123");
        assert_ne!(ids[0], ids[1]);
        // The 2-part hash is the hash of the two-element array, not of the 3-part one.
        assert_eq!(ids[1], hash_parts(&["@alice:example.com", "memberABC"]));
    }
}
