"""mmtag: train lightweight image + caption multi-label taggers.

`mmtag.read_csv` and `mmtag.write_submission` read and write the competition's CSV files; they
need neither torch nor the pretrained weights, and names are imported only when first used.
"""

__version__ = "0.1.0"
__all__ = ["CSVFormatError", "Columns", "Record", "Source", "configure_training", "distill",
           "load_run", "open_data", "read_csv", "train", "write_submission"]


def __getattr__(name: str):
    # Lazy so that `import mmtag` (and `mmtag --help`) stay instant.
    if name in ("train", "distill", "load_run"):
        from mmtag import api

        return getattr(api, name)
    if name in ("Columns", "Source", "open_data"):
        from mmtag.data import sources

        return getattr(sources, name)
    if name == "configure_training":
        from mmtag import process

        return process.configure_training
    if name in __all__:
        from mmtag.data import csv_io

        return getattr(csv_io, name)
    raise AttributeError(f"module 'mmtag' has no attribute {name!r}")
