"""The pure core: what to do with a message, decided from a snapshot of what is known, an answer
and the time, with no sockets, no clock, no SQLite and no asyncio (the way h11 and mitmproxy's
own proxy layers work). The engine (``peers.PeerTracker``) reads the snapshot, asks the core,
does the I/O and applies the effects. The invariants it keeps are in docs/architecture.md
("One delivery per message")."""
