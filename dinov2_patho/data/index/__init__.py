"""The tile index: a clustering CSV (or Parquet) ingested once into memory-mapped columns.

`TileIndex` and `build_index` are tile_index.py's; the files on disk are format.py's, the reading of
the table source.py's, the ingestion ingest.py's (its pass-1 scratch files scratch.py's, its whole-table
checks checks.py's), and `dinov2-patho index` cli.py's.
"""

from dinov2_patho.data.index.tile_index import TileIndex, build_index, tile_list_fingerprint

__all__ = ["TileIndex", "build_index", "tile_list_fingerprint"]
