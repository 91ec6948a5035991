"""The rounds room: the run context both modes share (``context``), their metric rows (``rows``), the one retry
rule (``retry``), synchronous-style rounds (``sync``), the asynchronous server (``asynchronous``) and the
entry point that runs an experiment into a run directory (``run``)."""
