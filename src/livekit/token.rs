//! The LiveKit access tokens MatrixRTC clients join a call with, signed with the LiveKit API key
//! through livekit-api's `AccessToken`: they may join exactly one room under exactly one
//! identity, publish, subscribe and update their own metadata, and not create rooms.

use std::time::Duration;

use livekit_api::access_token::{AccessToken, AccessTokenError, VideoGrants};

/// A token for `identity` to join LiveKit room `room`, valid for `ttl`.
pub fn join_token(
    api_key: &str,
    api_secret: &str,
    identity: &str,
    room: &str,
    ttl: Duration,
) -> Result<String, AccessTokenError> {
    let grants = VideoGrants {
        room_join: true,
        room: room.to_owned(),
        can_publish: Some(true),
        can_subscribe: Some(true),
        can_update_own_metadata: Some(true),
        room_create: false,
        ..Default::default()
    };
    AccessToken::with_api_key(api_key, api_secret).with_identity(identity).with_ttl(ttl).with_grants(grants).to_jwt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_one_room_to_one_identity() {
        let jwt =
            join_token("key", "secret-secret-secret-secret-secret", "ID", "ROOM", Duration::from_secs(3600)).unwrap();
        let verifier =
            livekit_api::access_token::TokenVerifier::with_api_key("key", "secret-secret-secret-secret-secret");
        let claims = verifier.verify(&jwt).unwrap();
        assert_eq!(claims.sub, "ID");
        assert_eq!(claims.iss, "key");
        let v = &claims.video;
        assert!(v.room_join && !v.room_create && !v.room_admin && !v.room_list);
        assert_eq!(v.room, "ROOM");
        assert_eq!((v.can_publish, v.can_subscribe, v.can_update_own_metadata), (Some(true), Some(true), Some(true)));
        assert_eq!(claims.exp - claims.nbf, 3600);
    }
}
