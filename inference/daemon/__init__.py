"""The inference daemon: one engine per base model, each in a supervised worker process.

`protocol` is what crosses the pipe between the daemon and a worker, `worker` is the worker
process, `pool` starts, routes to, watches and restarts workers within a memory budget,
`app` is the daemon's OpenAI-compatible HTTP face and `client` is how an API process talks
to a daemon, embedded or remote.
"""
