"""Talking to upstream registries: the HTTP client with retries and auth, the token
challenge flow, and the network guard that decides where an upstream may send us."""
