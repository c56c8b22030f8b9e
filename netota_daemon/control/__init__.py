"""The daemon's HTTP+JSON control API (``/v1/...``) on the control endpoint."""
