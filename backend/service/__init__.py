"""The ZeroMQ reconstruction service (docs/design.md section 6; the wire format is in
docs/protocol.md).

- ``protocol``: the envelope, message types and error codes (standalone: vendored into the add-on)
- ``client``: Lazy Pirate client and the non-blocking :class:`~avface.service.client.JobRun` (vendored too)
- ``server``: the ROUTER event loop; ``worker``: the job processes; ``store``: job folders
- ``cli``: ``avface serve|submit|jobs|fetch|cancel|keys|bench-service``; ``bench``: the load benchmark

Nothing here imports torch; only worker processes do, through ``avface.pipeline``.
"""
