"""Curation: from slides to the cluster tree the samplers train on (Vo et al. 2024; Chen et al. 2025).

    curate tiles   slides -> tissue tile list `slide_id,tile_x,tile_y` (tissue.py)
    curate embed   tile list -> (N, D) float16 embeddings memmap + slide row ranges (embed.py)
    curate kmeans  embeddings -> hierarchical k-means with resampling, per level (hierarchy.py)
    curate write   tile list + tree -> clustering CSV + tile index (write.py)
    curate sample  tree -> hierarchical balanced subset of row ids (.npy) for `data.subset` (sampling.py)

Rows are aligned end to end: row i of the tile list is row i of the embeddings, of every
level's assignment, of the written CSV and of the tile index built from it.
"""
