"""One real LiveKit participant, in a process of its own (so that kill -9 and SIGSTOP are real):
LiveKit's own client library (PyPI `livekit`, its native WebRTC stack inside the wheel) connects
with the URL and token given, publishes a synthetic microphone track (a 400 Hz tone, 10 ms
frames), and keeps sending it.

usage: participant.py URL TOKEN
stdin: `leave` hangs up cleanly (and exits); end of input does the same.
stdout: one JSON object per line: {"event": "connected", "sid", "identity", "room"},
        {"event": "reconnecting"}, {"event": "reconnected"}, {"event": "disconnected", "reason"},
        {"event": "left"}, {"event": "error", "error"}.
"""
import asyncio
import json
import math
import sys

from livekit import rtc

RATE = 48000
SAMPLES = RATE // 100  # 10 ms


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def tone(source):
    # One 10 ms frame holds a whole number of 400 Hz periods: computed once, sent again and again
    # (a participant costs LiveKit's encoder, not Python's arithmetic).
    frame = rtc.AudioFrame.create(RATE, 1, SAMPLES)
    data = frame.data
    for i in range(SAMPLES):
        data[i] = int(8000 * math.sin(2 * math.pi * 400 * i / RATE))
    while True:
        await source.capture_frame(frame)


async def commands(room):
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"leave":
            await room.disconnect()
            emit({"event": "left"})
            return


async def main(url, token):
    room = rtc.Room()
    room.on("reconnecting", lambda: emit({"event": "reconnecting"}))
    room.on("reconnected", lambda: emit({"event": "reconnected"}))
    room.on("disconnected", lambda reason=None: emit({"event": "disconnected", "reason": str(reason)}))
    try:
        await room.connect(url, token, rtc.RoomOptions(auto_subscribe=True))
    except Exception as e:  # noqa: BLE001 - reported to the test, which decides
        emit({"event": "error", "error": str(e)})
        return 1
    source = rtc.AudioSource(RATE, 1)
    track = rtc.LocalAudioTrack.create_audio_track("microphone", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await room.local_participant.publish_track(track, options)
    emit({
        "event": "connected",
        "sid": room.local_participant.sid,
        "identity": room.local_participant.identity,
        "room": room.name,
    })
    sending = asyncio.create_task(tone(source))
    await commands(room)
    sending.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
