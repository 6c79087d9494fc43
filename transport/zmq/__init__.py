"""ZeroMQ transport: `ZmqIngest` (the appliance's sockets) and `ZmqPublisher` (the client).

Why a package of its own: the appliance imports only the server, publishers only the publisher,
and both share nothing but the wire format and `transport.ingest` (SPEC section 7).
"""

from transport.errors import TransportBindError
from transport.zmq.publisher import ZmqPublisher
from transport.zmq.server import ZmqIngest

__all__ = ["TransportBindError", "ZmqIngest", "ZmqPublisher"]
