from setuptools import setup

# `samplers/`, `eval/` and `configs/` live at the top level of the repository but
# install under `dinov2_patho.` so there is never a top-level package named `eval`.
PACKAGE_DIR = {
    "dinov2_patho": "dinov2_patho",
    "dinov2_patho.samplers": "samplers",
    "dinov2_patho.eval": "eval",
    "dinov2_patho.configs": "configs",
}
PACKAGES = [
    "dinov2_patho",
    "dinov2_patho.data",
    "dinov2_patho.layers",
    "dinov2_patho.models",
    "dinov2_patho.loss",
    "dinov2_patho.train",
    "dinov2_patho.run",
    "dinov2_patho.samplers",
    "dinov2_patho.eval",
    "dinov2_patho.configs",
]

setup(
    name="dinov2_patho",
    version="0.1.0",
    description="DINOv2 pretraining for pathology on cluster-curated, stratified data",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"dinov2_patho.configs": ["*/*.yaml"]},
    install_requires=[
        # torch is constrained at install time (constraints/cpu.txt), never here:
        # a GPU machine brings its own CUDA build.
        "torch>=2.4",
        "timm>=1.0",
        "fvcore",
        "omegaconf>=2.3",
        "numpy>=1.26",
        "faiss-cpu>=1.8",
        "pyarrow>=15",
        "tqdm",
        "pillow",
        "h5py>=3.10",
        "scikit-learn>=1.4",
        "psutil",
    ],
    extras_require={
        "wsi": ["openslide-python>=1.3", "openslide-bin>=4.0", "tiffslide>=2.4", "tifffile", "imagecodecs"],
        "gpu": ["xformers", "faiss-gpu-cu12"],
        "slurm": ["submitit>=1.5"],
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "ruff>=0.6", "matplotlib"],
    },
    entry_points={"console_scripts": ["dinov2-patho = dinov2_patho.cli:main"]},
)
