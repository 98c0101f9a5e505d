"""Other tools' files in and out: TRIDENT and CLAM feature files (``.h5``) imported as feature views, and a
view's tiles exported as QuPath GeoJSON, AnnData (``.h5ad``) and TRIDENT-layout ``.h5`` files.

Reading and writing HDF5 needs h5py (the ``exchange`` extra); it is imported inside the functions that use it,
so the rest of HistCode works without it. See docs/exchange.md.
"""
