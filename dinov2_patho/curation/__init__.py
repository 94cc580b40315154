"""Curation: from slides to the cluster tree the samplers train on (Vo et al. 2024; Chen et al. 2025).

    curate tiles   slides -> tissue tile list `slide_id,tile_x,tile_y` (tissue.py: tissue_tiles)
    curate embed   tile list -> (N, D) float16 embeddings memmap + slide row ranges (embed.py: embed_tiles)
    curate kmeans  embeddings -> hierarchical k-means with resampling, per level (hierarchy.py: build_tree)
    curate write   tile list + tree -> clustering CSV + tile index (write.py: write_tree)
    curate sample  tree -> balanced subset of row ids (.npy) for `data.subset` (sampling.py: balanced_subset)

Each action is that function, with its config section's dataclass beside it; cli.py only parses the
flags, pipeline.py's `curate` runs the chain.

Rows are aligned end to end: row i of the tile list is row i of the embeddings, of every
level's assignment, of the written CSV and of the tile index built from it.
"""
