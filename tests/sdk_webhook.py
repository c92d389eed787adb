"""Produces a LiveKit webhook with LiveKit's own Python server SDK (PyPI `livekit-api`), so the
bridge's verification is checked against an implementation we did not write.

usage: sdk_webhook.py KEY SECRET EVENT ROOM ROOM_SID IDENTITY PARTICIPANT_SID JOINED_AT [REASON]
prints: {"body": "...", "authorization": "..."}
"""
import base64
import hashlib
import json
import sys
import time
from datetime import timedelta

from google.protobuf.json_format import MessageToJson
from livekit import api
from livekit.protocol import models, webhook

key, secret, event, room, room_sid, identity, sid, joined_at = sys.argv[1:9]
reason = sys.argv[9] if len(sys.argv) > 9 else None

participant = models.ParticipantInfo(
    sid=sid,
    identity=identity,
    state=models.ParticipantInfo.State.DISCONNECTED if event != "participant_joined" else models.ParticipantInfo.State.ACTIVE,
    joined_at=int(joined_at),
)
if reason:
    participant.disconnect_reason = models.DisconnectReason.Value(reason)
ev = webhook.WebhookEvent(
    event=event,
    room=models.Room(sid=room_sid, name=room, empty_timeout=300),
    participant=participant,
    id="EV_sdk%d" % int(time.time() * 1000),
    created_at=int(time.time()),
)
body = MessageToJson(ev)
sha = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
token = api.AccessToken(key, secret).with_ttl(timedelta(minutes=5)).with_sha256(sha).to_jwt()
print(json.dumps({"body": body, "authorization": token}))
