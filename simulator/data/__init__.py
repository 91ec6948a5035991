"""The data room: shards and their protocol (``base``), the built-in generated datasets (``builtin``), pooled
datasets and their partitioners, the LEAF and table file datasets with their shared on-disk cache
(``filecache``), and the registry (``registry.make_dataset``)."""
