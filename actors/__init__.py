"""The execution room: backends behind ``simulator.contract.Backend`` (the Ray actor pool in ``pool`` and its
cluster connection in ``cluster``, the in-process worker in ``inline``), ``backends.make_backend`` that picks
one from ``[system]``, and the command line (``cli``), the one composition root that knows the core, the
backends and ``analysis``."""
