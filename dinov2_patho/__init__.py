"""DINOv2 pretraining for pathology on cluster-curated data with stratified batches."""

__version__ = "0.1.0"
