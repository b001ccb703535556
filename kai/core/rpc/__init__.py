"""The sans-IO internal RPC: msgpack-RPC framing and the HMAC handshake."""
