"""WebRTC signaling relay (y-webrtc compatible, authenticated, clustered) and ICE/TURN config."""

from signaling.config import SignalingSettings, ice_config, turn_credentials
from signaling.service import SignalingService

__all__ = ["SignalingService", "SignalingSettings", "ice_config", "turn_credentials"]
