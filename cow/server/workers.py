"""Requests served off the reader thread: reads started over an NBD backing, whose replies the
connection's replier threads send (_OffTheReader, a part of cow/server/connection.py's
_Connection), and the connection's worker threads (_Workers).

Most reads over an NBD backing never come here: Engine.serve starts them and serve_replies, on the
connection's served replier thread, answers them, both without the GIL (cow/areads.pxi).  The
front end's own path (_start_read and _reply_reads) serves the rest: under --verbose, and what
Engine.serve leaves to it."""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import TYPE_CHECKING

from cow import protocol as P
from cow.engine import REPLIED_BROKEN, REPLIED_END, REPLIED_FAILED, ReadQueue, serve_replies
from cow.protocol import NBD_CMD_READ, READ_REPLY_PREFIX
from cow.server.errors import client_message, nbd_error_from_errno
from cow.server.replies import _WorkerSpace
from cow.server.sockets import sendmsg_all
from cow.server.tuning import MAX_QUEUED_PER_CONNECTION

if TYPE_CHECKING:
    from cow.server.connection import _Connection

log = logging.getLogger("cow.server")


class _OffTheReader:
    """_Connection's reads started over an NBD backing, their replier, and its workers."""

    def _start_read(self, cookie, flags, offset, count, batch) -> bool:
        """Start a READ that waits for a slow backing and go on reading requests: the engine
        fills the buffer as the backing answers, and the replier thread sends the reply.  So a
        client's whole queue depth becomes backing reads in flight, with no thread each.
        False: the engine cannot start this one so (cow-on-read...): a worker serves it."""
        reads = self.reads
        if reads is None:
            reads = self.reads = ReadQueue()
            self.replier = threading.Thread(target=self._reply_reads, daemon=True,
                                            name=f"cow-conn{self.id}-replier")
            self.replier.start()
        tx, budget = self.tx, self.server.read_budget
        if tx.reads_in_flight >= MAX_QUEUED_PER_CONNECTION or not budget.try_take(tx, count):
            # At a bound: no more requests are read until replies leave.  What is held back
            # leaves first (the client may wait for it before reading on).
            batch.flush()
            try:
                tx.take_read_slot()  # a client that never reads its replies stops being read
                try:
                    budget.take(tx, count)
                except OSError:
                    tx.give_read_slot()
                    raise
            except OSError as e:  # shutting down (or broken): this one is not started
                batch.add(self._error_reply(cookie, NBD_CMD_READ, flags, offset, count,
                                            nbd_error_from_errno(e.errno), client_message(e)))
                return True
        else:
            tx.take_read_slot()  # free: no wait
        buf = self._read_buffers.get(count)
        at = READ_REPLY_PREFIX
        with self._in_workers_lock:
            self.in_workers += 1
        try:
            started = self.engine.pread_start(memoryview(buf)[at:at + count], offset, reads,
                                              (cookie, flags, offset, count, buf))
        except (OSError, ValueError) as e:
            started = e
        if started is False:
            return True
        tx.give_read_slot()
        with self._in_workers_lock:
            self.in_workers -= 1
        budget.give(tx, count)
        if started is None:
            self._read_buffers.put(buf)
            return False
        if isinstance(started, BaseException):
            self._read_buffers.put(buf)
            err = nbd_error_from_errno(started.errno) if isinstance(started, OSError) \
                else P.NBD_EINVAL
            batch.add(self._error_reply(cookie, NBD_CMD_READ, flags, offset, count, err,
                                        client_message(started), started))
            return True
        # Done at once (the blocks were copied up meanwhile): the batch sends this buffer
        # later, so it does not go back to the pool (and the batch bounds what it holds).
        start = self.proto.read_reply_into(buf, cookie, offset, count)
        batch.add(memoryview(buf)[start:at + count])
        return True

    def _reply_reads(self) -> None:
        """The replier: send the replies of started reads as they finish, all that finished
        together in one sendmsg."""
        reads, proto, budget, tx = self.reads, self.proto, self.server.read_budget, self.tx
        while True:
            done = reads.wait()
            if not done:
                return  # closed, and nothing pending
            replies = []
            for (cookie, flags, offset, count, buf), status in done:
                if status:
                    err = -status
                    replies.append(self._error_reply(cookie, NBD_CMD_READ, flags, offset, count,
                                                     nbd_error_from_errno(err),
                                                     os.strerror(err)))
                else:
                    start = proto.read_reply_into(buf, cookie, offset, count)
                    replies.append(memoryview(buf)[start:READ_REPLY_PREFIX + count])
                    if self.verbose:
                        log.info("connection %d: READ offset=%d count=%d flags=0x%x -> OK",
                                 self.id, offset, count, flags)
            try:
                self._send_replies(replies)
            finally:
                replies.clear()
                for token, _ in done:
                    self._read_buffers.put(token[4])
                    budget.give(tx, token[3])
                    tx.give_read_slot()
                    self._worker_done()

    def _send_replies(self, replies: list) -> None:
        """Send replies together (one sendmsg, under the send lock), unless the client is
        gone; a send that fails means it is."""
        try:
            if not self.broken:
                with self.send_lock:
                    sendmsg_all(self.sock, replies)
        except OSError as e:
            self._client_gone(e)

    def _start_served_replier(self) -> None:
        self.served_replier = threading.Thread(target=self._reply_served, daemon=True,
                                               name=f"cow-conn{self.id}-served")
        self.served_replier.start()

    def _reply_served(self) -> None:
        """The served replier: serve_replies sends the replies of the reads Engine.serve
        started, and comes back here only for reads that failed (their error replies are
        worded here), a client gone, or the last read answered at shutdown."""
        engine, tx = self.engine, self.tx
        while True:
            status, info = serve_replies(engine, tx)
            if status == REPLIED_END:
                return
            if status == REPLIED_FAILED:
                self._send_replies([
                    self._error_reply(cookie, NBD_CMD_READ, flags, offset, count,
                                      nbd_error_from_errno(err), os.strerror(err))
                    for cookie, flags, offset, count, err in info])
            elif status == REPLIED_BROKEN:
                self._client_gone(os.strerror(info))
            self._wake_if_idle()

    def _start_workers(self) -> _Workers:
        self.workers = _Workers(self, self.server.max_workers)
        return self.workers


class _Workers:
    """A connection's workers: requests that may wait for a slow (NBD) backing, and large
    READ/WRITE, whose transfer then overlaps with the next request's.  A worker is started
    whenever a request is handed over and none is free, up to ``limit``; they stay until the
    connection ends."""

    def __init__(self, conn: _Connection, limit: int):
        self.conn = conn
        self.limit = limit
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.slots = threading.BoundedSemaphore(MAX_QUEUED_PER_CONNECTION)
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.pending = 0  # handed over and not finished

    def submit(self, job) -> None:
        self.slots.acquire()  # a client that never reads its replies stops being read
        with self.lock:
            self.pending += 1
            grow = self.pending > len(self.threads) and len(self.threads) < self.limit
            if grow:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"cow-conn{self.conn.id}-worker{len(self.threads)}")
                self.threads.append(t)
        if grow:
            t.start()
        self.jobs.put(job)

    def _work(self) -> None:
        conn = self.conn
        space = _WorkerSpace(conn)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            cmd, flags, cookie, offset, count, payload, owned = job
            try:
                if not conn.broken:
                    conn._send(conn._handle(cmd, flags, cookie, offset, count, payload, space))
            except OSError as e:
                conn._client_gone(e)
            finally:
                space.release()
                if owned is not None:
                    conn._give_back_payload_buffer(owned, count)
                with self.lock:
                    self.pending -= 1
                self.slots.release()
                conn._worker_done()

    def close(self) -> None:
        """Finish every queued request, then stop the threads."""
        with self.lock:
            self.limit = 0  # no more
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
