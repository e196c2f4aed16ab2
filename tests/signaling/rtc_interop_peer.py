"""A Python WebRTC peer (clients.rtc) run by test_signaling_ywebrtc inside its network namespace.

usage: python rtc_interop_peer.py <unix socket> <room> <seconds>
Prints one JSON line: the y-webrtc peer it linked with, who initiated, and the first bytes that
peer sent on the data channel (y-webrtc opens with a y-protocols sync step 1: 00 00 …).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from clients.rtc import RtcRoom  # noqa: E402


async def main(sock: str, room: str, seconds: float) -> None:
    async with RtcRoom("ws://localhost/signaling", room, unix_socket=sock, loopback=True) as r:
        print(json.dumps({"event": "ready", "peerId": r.peer_id}), flush=True)
        peer = await r.wait_peer(seconds)
        first = await peer.recv(seconds)
        raw = first if isinstance(first, bytes) else first.encode()
        print(json.dumps({"event": "linked", "remote": peer.remote_id, "initiator": peer.initiator,
                          "first": raw[:8].hex(), "ms": round((peer.connected_after or 0) * 1000)}), flush=True)
        # Hold the link until told to go (stdin closes), so the Node side can see us as a peer.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
