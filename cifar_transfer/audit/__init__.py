"""What a feature set says of its data: similar images, near-duplicates and leakage, likely label errors, outliers.

Prefect-free, and streamed: every module reads the features a shard at a time through the reading API (`store`), so
memory holds a shard, a block of queries and the neighbour lists (rows x k), never the whole set.

- `vectors`: the set's rows in one order (train, then test), pooled and normalized, shard by shard.
- `index`: the nearest-neighbour index kept with the set: exact blocked search up to a size, usearch's HNSW above
  it, updated when a collection grows and rebuilt only when rows it holds changed.
- `neighbours`: every row's k nearest rows (the graph the tables below are read from).
- `folds`: out-of-fold class probabilities from the head family the run chose (no row scored by a head that saw it).
- `tables`: the duplicate pairs (with clusters), the label issues and the outliers, as Arrow tables.
- `stage`: the audit of a set, written under `features/<set>/audit/`, reused while its inputs are unchanged.
- `similar`: the nearest images of a query (an image file through the set's own extractor, or a row of the set).
"""
