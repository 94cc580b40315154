"""Frozen backbones, below evaluation and curation: loading one (`load.load_backbone`: a training run's
teacher, a weights file, a timm or hub model), its preprocessing, and the feature engine
(`features.fill_features`) that evaluation, slide bags and `curate embed` run."""
