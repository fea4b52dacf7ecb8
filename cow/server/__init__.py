"""python -m cow.server: serve the copy-on-write view of a backing image over NBD.

This package owns the sockets and the threads; the NBD wire format lives in ``cow/protocol.py``,
the copy-on-write in the compiled ``cow.engine``, and the command line (argv, start-up, shutdown)
in ``cow/cli.py``.  Per request: recv -> decode -> validate -> one engine call (GIL released) ->
encode -> send.

A connection's path, file by file:
- ``accept.py``: Server accepts it (within --max-connections) and starts its thread; at SIGTERM
  it shuts every connection down.
- ``connection.py``: _Connection, its state and its life: handshake, transmission, close.
- ``handshake.py``: the greeting, option haggling and the TLS upgrade.
- ``transmission.py``: the reader loop: decode, validate, then serve inline (with the engine's
  Engine.serve, or _handle here) or hand over; WRITEs spliced from the socket.
- ``workers.py``: what runs off the reader thread: reads started over an NBD backing and their
  replier, and the worker threads.
- ``receive.py``, ``replies.py``, ``sockets.py``: the receive buffer; reply batches, buffers
  and the read budget; the socket calls they share.
- ``errors.py``: the NBD error and message a client is sent; ``tuning.py``: sizes, budgets and
  timeouts.

Importing this package (or tuning.py) needs no compiled engine: ``python -m cow.server --help``
works without one.
"""
