"""HTTP API: the Litestar app factory and one controller per resource."""
