"""The client room: the worker that runs a cohort of client updates and evaluations (``worker``), and held-out
evaluation with adaptation (``evaluation``)."""
