"""jobd: the jobcore daemon (design/daemon.md).

    jobd --run-dir DIR [--config FILE] [--log-level LEVEL]

Serves the jobcore API over ``DIR/jobd.sock`` (read-write) and ``DIR/jobd-ro.sock``
(read-only). Driver connections are opened on demand by read-write clients, one per
driver identity (``sim:///NAME`` whatever the query; ``qemu:///session`` and its ``dir``):
every client naming ``sim:///default`` shares one simulated host, configured by the hello
that opened it. They outlive the clients that began jobs on them and are closed once they
have had no client and no job for ``driver_idle_timeout`` seconds.

Where things are: ``config`` (every limit, ``DaemonConfig``, ``load_config``), ``rundir``
(the run directory's lock), ``drivers`` (driver connections), ``sessions`` (one client's
state and budgets), ``server`` (``Daemon``: sockets, accept loop, framing, dispatch),
``handlers`` (one function per request method), ``fleet`` (jobd as a fleet member:
``FleetService``, ``FleetJob``), ``main`` (``jobd``'s command line).
"""
