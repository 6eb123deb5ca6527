"""Phase 2, ``load``: datasets.

* :mod:`engine.data.loading`: ``load_dataset(source, cache_dir) -> Dataset`` (picks the registered format).
* :mod:`engine.data.dataset`: the ``Dataset`` / ``Split`` types and the checks every format shares.
* :mod:`engine.data.split`: ``split_dataset(dataset, val_fraction, seed) -> Split`` and lazy row subsets.
* one module per format: :mod:`~engine.data.npz`, :mod:`~engine.data.pt`, :mod:`~engine.data.tabular`
  (csv, parquet), :mod:`~engine.data.image_folder`.
* :mod:`engine.data.plan`: the job's data plan (held-out rows, each step's training data).
"""
