"""The run-directory room: Parquet metrics tables (``metrics``), checkpoints and exact resume (``checkpoint``),
``summary.json`` (``summary``) and atomic whole-file writes (``files``)."""
