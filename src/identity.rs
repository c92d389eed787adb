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

/// `b64(sha256(json(parts)))`: standard alphabet, no padding.
fn hash_parts(parts: &[&str]) -> String {
    STANDARD_NO_PAD.encode(digest_parts(parts))
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

/// The identities of one member, kept compactly for matching: the two hashed forms as their raw
/// digests (64 bytes, no allocation), the legacy form not at all (it is the member's user and
/// device ids, which the caller has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// The 3-part digest; `None` without a device id.
    three: Option<[u8; 32]>,
    two: [u8; 32],
}

impl Watch {
    pub fn new(user_id: &str, device_id: &str, member_id: &str) -> Self {
        let three = (!device_id.is_empty()).then(|| digest_parts(&[user_id, device_id, member_id]));
        Watch { three, two: digest_parts(&[user_id, member_id]) }
    }

    /// The member's most specific hashed identity (for logs).
    pub fn primary(&self) -> String {
        STANDARD_NO_PAD.encode(self.three.unwrap_or(self.two))
    }

    /// Every identity the member may connect under, most specific first (the strings of
    /// [`member_identities`], without re-hashing).
    pub fn identities(&self, user_id: &str, device_id: &str) -> Vec<String> {
        let mut all: Vec<String> = self.three.iter().chain([&self.two]).map(|d| STANDARD_NO_PAD.encode(d)).collect();
        if !device_id.is_empty() {
            all.push(identity_legacy(user_id, device_id));
        }
        all
    }

    /// Whether `identity` is one the member may connect under.
    pub fn matches(&self, identity: &str, user_id: &str, device_id: &str) -> bool {
        let mut digest = [0u8; 32];
        if identity.len() == 43 && STANDARD_NO_PAD.decode_slice(identity, &mut digest) == Ok(32) {
            return digest == self.two || Some(digest) == self.three;
        }
        // Legacy `@user:server:DEVICE`.
        !device_id.is_empty()
            && identity.strip_prefix(user_id).and_then(|rest| rest.strip_prefix(':')) == Some(device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn identities_are_distinct_and_include_the_legacy_form() {
        let ids = member_identities("@alice:example.com", "DEVICE123", "memberABC");
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[2], "@alice:example.com:DEVICE123");
        assert_ne!(ids[0], ids[1]);
        // The 2-part hash is the hash of the two-element array, not of the 3-part one.
        assert_eq!(ids[1], hash_parts(&["@alice:example.com", "memberABC"]));
    }
}
