"""Connection rules below the app, where a slow or half-open client costs the server nothing but a socket:
time limits on request headers and bodies and on answers the client does not read, a cap on open connections in
all and per client (the oldest connection still waiting for its headers, or for its client to read, makes room),
and a refused request's remaining body dropped for at most a moment (the connection then serves on if the body
ended, else it is closed) instead of read to its end. A pipelined request is answered only once the answer
before it has left for the client, and the kernel holds little of an answer not sent yet: a client that sends
requests but reads no answers gets a few, not thousands."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)
FD_MARGIN = 64           # descriptors kept free for model files, the record and the listening socket
LINGER_SECONDS = 1.0     # after an early answer, the rest of the client's body is dropped this long, then closed
LINGER_BYTES = 4 << 20   # ... or until this much has been discarded
SUMMARY_SECONDS = 60     # closed idle connections are logged as one line per this many seconds
UNSENT_BYTES = 16384     # what the kernel holds of an answer not yet sent (its buffer otherwise grows to MBs)
EVICTABLE_AFTER = 1.0    # a connection waiting for headers this long may be closed to make room
BURST_SECONDS = 2.0      # an address that was quiet may start this many seconds' worth of requests at once


def client_network(host: str) -> str:
    """The unit every per-client limit counts: an IPv4 address, or the /64 network of an IPv6 one (one host or
    home is given a whole /64, so counting its addresses one by one would give it billions of shares); an
    IPv4-mapped IPv6 address counts as its IPv4 address.

    >>> client_network("2001:db8:1:2:aaaa::1"), client_network("::ffff:10.0.0.7"), client_network("10.0.0.7")
    ('2001:db8:1:2::/64', '10.0.0.7', '10.0.0.7')
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a Unix socket path, a test client's name
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclass(frozen=True)
class ConnectionLimits:
    header_seconds: float = 10      # a connection must send a request's headers within this time
    body_seconds: float = 120       # ... and its whole body within this time after the headers
    send_seconds: float = 30        # an answer may wait this long for its client to read some of it
    max_connections: int = 4096     # open connections in all (kept under the process's descriptor limit)
    max_per_client: int = 2048      # open connections from one address
    requests_per_second: float = 50  # requests one address may start a second (after a burst of BURST_SECONDS)

    def effective_max(self) -> int:
        """``max_connections``, or fewer when the process may not open that many files; the soft limit is
        raised towards the hard one first (a server holding thousands of idle sockets needs it)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.max_connections + FD_MARGIN
        if soft != resource.RLIM_INFINITY and soft < wanted:
            soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        most = self.max_connections if soft == resource.RLIM_INFINITY else max(1, min(self.max_connections,
                                                                                       soft - FD_MARGIN))
        if most < self.max_connections:
            logger.warning("the file-descriptor limit (%d) allows at most %d open connections, not %d", soft, most,
                           self.max_connections)
        return most


class ConnectionGuard:
    """Bookkeeping shared by every connection of one server: which are open and which are waiting for request
    headers, per client address, and counts for the periodic log line. A waiting connection can be closed to
    make room once it has waited ``EVICTABLE_AFTER`` seconds: a client sends its headers well within that, so
    a flood of new connections closes the flood's older ones, never a request on its way in."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.max_connections = limits.effective_max()
        self.open = 0
        self.per_client: dict[str, set[GuardedH11Protocol]] = {}
        self.waiting: dict[str, dict[GuardedH11Protocol, float]] = {}  # per address, oldest first -> since when
        self.stalled: dict[str, dict[GuardedH11Protocol, float]] = {}  # answers the client is not reading (or
        # pipelined requests waiting for their address's turn)
        self.closed = {"headers": 0, "unread": 0, "evicted": 0, "refused": 0}
        self.next_turn: dict[str, float] = {}  # per address: when its next request may start
        self._next_summary = 0.0

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Register a new connection; False when it must be closed at once (no room, none evictable). Room is
        made by closing a connection waiting for headers: of the new one's own address when that address is at
        its cap, else of the address holding the most connections."""
        mine = self.per_client.setdefault(conn.address, set())
        full = len(mine) >= self.limits.max_per_client and not self._evict(conn.address)
        if not full and self.open >= self.max_connections:
            greediest = max(self.per_client, key=lambda address: len(self.per_client[address]))
            full = not self._evict(greediest) and not any(self._evict(a) for a in list(self.waiting))
        if full:
            self.count("refused")
            if not mine:
                del self.per_client[conn.address]
            return False
        self.open += 1
        mine.add(conn)
        return True

    def wait(self, conn: GuardedH11Protocol) -> None:
        """``conn`` now waits for a request's headers."""
        waiting = self.waiting.setdefault(conn.address, {})
        waiting.pop(conn, None)
        waiting[conn] = conn.loop.time()

    def stop_waiting(self, conn: GuardedH11Protocol) -> None:
        waiting = self.waiting.get(conn.address, {})
        waiting.pop(conn, None)
        if not waiting:
            self.waiting.pop(conn.address, None)

    def is_waiting(self, conn: GuardedH11Protocol) -> bool:
        return conn in self.waiting.get(conn.address, {})

    def stall(self, conn: GuardedH11Protocol, stalled: bool, *, evictable_now: bool = False) -> None:
        """``conn``'s answer stopped (True) or went on (False) reaching its client; ``evictable_now``: it may be
        closed to make room at once, not only after ``EVICTABLE_AFTER``."""
        mine = self.stalled.setdefault(conn.address, {})
        mine.pop(conn, None)
        if stalled:
            mine[conn] = conn.loop.time() - (EVICTABLE_AFTER if evictable_now else 0.0)
        if not mine:
            del self.stalled[conn.address]

    def turn(self, address: str) -> float:
        """Seconds until a new request of ``address`` may start, its place in the queue of that address taken:
        requests start ``1 / requests_per_second`` apart, after a burst of ``BURST_SECONDS`` of them (the
        generic cell rate algorithm). However many connections a client opens, the work it asks for is bounded."""
        now = asyncio.get_running_loop().time()
        start = max(self.next_turn.get(address, now), now - BURST_SECONDS)
        self.next_turn[address] = start + 1 / self.limits.requests_per_second
        return max(0.0, start - now)

    def forget(self, conn: GuardedH11Protocol) -> None:
        self.stop_waiting(conn)
        self.stall(conn, False)
        mine = self.per_client.get(conn.address, set())
        if conn in mine:
            mine.discard(conn)
            self.open -= 1
        if not mine:
            self.per_client.pop(conn.address, None)
            if self.next_turn.get(conn.address, 0.0) <= conn.loop.time():
                self.next_turn.pop(conn.address, None)

    def count(self, reason: str) -> None:
        self.closed[reason] += 1
        now = asyncio.get_running_loop().time()
        if now >= self._next_summary:
            self._next_summary = now + SUMMARY_SECONDS
            logger.warning(
                "connection guard: closed %d connections that sent no request headers within %gs and %d whose "
                "client read no answer within %gs, evicted %d waiting ones to make room and refused %d (%d open, at "
                "most %d in all and %d per client)", self.closed["headers"], self.limits.header_seconds,
                self.closed["unread"], self.limits.send_seconds, self.closed["evicted"], self.closed["refused"],
                self.open, self.max_connections, self.limits.max_per_client)
            self.closed = dict.fromkeys(self.closed, 0)

    def _evict(self, address: str) -> bool:
        """Close the longest-waiting connection of ``address`` that has waited long enough, passing over a
        kept-alive one whose next request has arrived but is not parsed yet (it is about to be served); else the
        one whose client has left its answer unread longest."""
        deadline = asyncio.get_running_loop().time() - EVICTABLE_AFTER
        for conn, since in self.waiting.get(address, {}).items():
            if since > deadline:
                break
            if not (conn.served and conn.has_unread_bytes()):
                return self._close(conn, conn.close_now)
        oldest = next(iter(self.stalled.get(address, {}).items()), None)
        return oldest is not None and oldest[1] <= deadline and self._close(oldest[0], oldest[0].abort)

    def _close(self, conn: GuardedH11Protocol, how: Callable[[], None]) -> bool:
        self.count("evicted")
        how()
        self.forget(conn)
        return True


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the rules of this module; ``guarded_protocol`` binds it to one guard."""

    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self.address = client_network(peer[0]) if peer else ""
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._turn_timer: asyncio.TimerHandle | None = None
        self._held: bytes | None = None  # a request's first bytes, waiting for the turn of its address
        self._charged = False  # the request on its way has taken its turn
        self._next_when_sent = False  # a pipelined request waits for the answer before it to leave
        self._unsent = 0  # bytes of an answer left in the transport when writing paused
        self._discarded: int | None = None  # bytes thrown away after an early answer; None: not lingering
        self.served = False  # has answered a request (so, kept alive, it waits for the next one)
        self.refused = not self.guard.admit(self)
        if self.refused:  # as cheaply as possible: a flood of these is what the guard is for
            transport.abort()
            return
        super().connection_made(transport)
        # Writing pauses as soon as an answer is not wholly in the kernel, so the send timer below runs for any
        # answer the client is not reading, and a pipelined request waits until the answer before it has left.
        transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_BYTES)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self._cancel_timer()
        self._stop_send_timer()
        self._stop_turn_timer()
        self.guard.forget(self)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """Part of an answer waits for the client to read: it gets ``send_seconds`` to take some of it, again
        after each part, before the connection is closed; meanwhile a connection with room to make may close it."""
        super().pause_writing()
        self._unsent = self.transport.get_write_buffer_size()
        self.guard.stall(self, True)
        self._stop_send_timer()
        self._send_timer = self.loop.call_later(self.guard.limits.send_seconds, self._not_read)

    def resume_writing(self) -> None:
        self._stop_send_timer()
        self.guard.stall(self, False)
        super().resume_writing()
        if self._next_when_sent:
            self._next_when_sent = False
            self.on_response_complete()

    def data_received(self, data: bytes) -> None:
        if self._held is not None:  # reading is paused, but a chunk read before may still come
            self._held += data
            return
        if self._discarded is not None:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.close_now()
                return
        waiting_for_headers = self.guard.is_waiting(self)
        if waiting_for_headers and (wait := self._turn_wait()) > 0:  # held meanwhile; the header limit still runs
            self._held = data
            self.transport.pause_reading()
            self._turn_timer = self.loop.call_later(wait, self._release_held)
            return
        super().data_received(data)  # after an early answer h11 drops the rest of the body
        state = self.conn.their_state
        if self._discarded is not None and state is not h11.SEND_BODY:  # the refused body ended in time
            self._discarded = None
            self._cancel_timer()
            if state is h11.IDLE:
                self._await_headers()
        elif waiting_for_headers and state is not h11.IDLE:  # a request has started
            self._charged = False
            self.guard.stop_waiting(self)
            self._cancel_timer()
            if state is h11.SEND_BODY:
                self._timer = self.loop.call_later(self.guard.limits.body_seconds, self._body_too_slow)
        elif not waiting_for_headers and state is not h11.SEND_BODY and self._timer is not None:
            self._cancel_timer()  # the body is complete

    def on_response_complete(self) -> None:
        unread_body = self.conn.their_state is h11.SEND_BODY
        if not unread_body and not self.transport.is_closing():
            if self.flow.write_paused:
                self._next_when_sent = True  # a client that is not reading gets no further answers
                return
            if self.conn.trailing_data[0] and (wait := self._turn_wait()) > 0:  # a pipelined request waits too,
                self.guard.stall(self, True, evictable_now=True)  # the first to be closed when room is needed
                self._turn_timer = self.loop.call_later(wait, self._pipelined_turn)
                return
        self._charged = False
        self.served = True
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if unread_body:  # answered before the body was read (a refusal): its rest is dropped for a moment only
            self._cancel_timer()
            self._discarded = 0
            self._timer = self.loop.call_later(LINGER_SECONDS, self.close_now)
        elif self.conn.their_state is h11.IDLE:
            self._await_headers()
        elif self.conn.their_state is h11.SEND_BODY and self._timer is None:  # a pipelined request's body
            self._timer = self.loop.call_later(self.guard.limits.body_seconds, self._body_too_slow)

    def has_unread_bytes(self) -> bool:
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            with socket.socket(fileno=os.dup(sock.fileno())) as peek:
                return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waiting (EAGAIN), or the socket is gone
            return False

    def close_now(self) -> None:
        self._cancel_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what the transport still holds (an answer nobody reads would keep a closing
        transport open)."""
        self._cancel_timer()
        self._stop_send_timer()
        self.transport.abort()

    def _not_read(self) -> None:
        if self.transport.get_write_buffer_size() < self._unsent:  # a slow client, but reading
            self.pause_writing()
            return
        self._send_timer = None
        self.guard.count("unread")
        self.abort()

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _turn_wait(self) -> float:
        """Seconds the request on its way must wait for its address's turn; a request takes one turn only."""
        if self._charged:
            return 0.0
        self._charged = True
        return self.guard.turn(self.address)

    def _release_held(self) -> None:
        self._turn_timer = None
        data, self._held = self._held, None
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self.data_received(data)

    def _pipelined_turn(self) -> None:
        self._turn_timer = None
        self.guard.stall(self, False)
        self.on_response_complete()

    def _stop_turn_timer(self) -> None:
        if self._turn_timer is not None:
            self._turn_timer.cancel()
            self._turn_timer = None

    def _await_headers(self) -> None:
        self._charged = False
        self.guard.wait(self)
        self._cancel_timer()
        self._timer = self.loop.call_later(self.guard.limits.header_seconds, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.guard.count("headers")
        self.close_now()

    def _body_too_slow(self) -> None:
        logger.warning("%s: closed the connection: the request body did not arrive within %gs", self.address,
                       self.guard.limits.body_seconds)
        self.close_now()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` whose connections share one new guard."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": ConnectionGuard(limits)})
