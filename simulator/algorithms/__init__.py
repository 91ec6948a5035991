"""The algorithms room. ``record`` says what an algorithm is; ``steps`` holds the shared step helpers and the
one inner loop; one file per family (``fedavg``, ``maml``, ``perfedavg``, ``metasgd``) declares its client
step, vectorized step and record; ``stacked`` is the vectorized engine; ``server`` the server state and
optimizers; ``aggregation`` the weighted mean and the asynchronous rules; ``registry`` lists the records."""
