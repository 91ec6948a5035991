"""metafleet's pure core: configuration, data, models, algorithms, scheduling, client work, run directories
and rounds, with no Ray, ``actors`` or ``analysis`` import.

Rooms, bottom to top (a module imports only from rooms below it): ``rng``, ``config`` (schema, TOML);
``contract`` (what crosses to a backend), ``params``, ``plugins``; ``data``, ``models``; ``algorithms``;
``experiment`` (validated configs); ``scheduling``; ``client``; ``rundir``; ``rounds`` (``rounds.run.run``
runs an experiment into a run directory with a backend from ``actors.backends.make_backend``).
"""
