"""monkestream: live prices and chat over Server-Sent Events, in pure-stdlib Python.

The public API: the hub for embedding in any asyncio program, the operators
that build pipelines on it, and the pieces that run the server.
"""

from __future__ import annotations

from .hub import CloseReason, Event, Hub, Policy, Subscription
from .sse import EventId, EventStreamParser, encode_event

__all__ = ["CloseReason", "Event", "EventId", "EventStreamParser", "Hub", "Policy",
           "Subscription", "encode_event", "__version__"]
__version__ = "0.1.0"
