from setuptools import find_packages, setup

# `samplers/`, `eval/` and `configs/` live at the top level of the repository but
# install under `dinov2_patho.` so there is never a top-level package named `eval`.
PACKAGE_DIR = {
    "dinov2_patho": "dinov2_patho",
    "dinov2_patho.samplers": "samplers",
    "dinov2_patho.eval": "eval",
    "dinov2_patho.configs": "configs",
}


def mapped_packages(package: str, directory: str) -> list[str]:
    """`package` and its subpackages, found under `directory`."""
    return [package] + [f"{package}.{sub}" for sub in find_packages(directory)]


PACKAGES = find_packages(include=["dinov2_patho", "dinov2_patho.*"]) + [
    name for package, directory in PACKAGE_DIR.items() if package != "dinov2_patho"
    for name in mapped_packages(package, directory)
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
        "omegaconf>=2.3",
        "numpy>=1.26",
        "faiss-cpu>=1.8",
        "pyarrow>=15",
        "tqdm",
        "pillow",
        "h5py>=3.10",
        "scikit-learn>=1.4",
        "threadpoolctl",  # one BLAS thread for small logistic regressions (a scikit-learn dependency)
        "scipy",  # curation: tissue mask morphology (already a scikit-learn dependency)
        "matplotlib",  # eval's results plot
        "pyyaml",  # config errors (yaml.YAMLError); omegaconf brings it, but we import it
        "safetensors",  # .safetensors checkpoints (timm brings it, but we import it)
        "huggingface_hub",  # hf-hub:ORG/NAME backbones, local cache only (timm brings it; we import it)
    ],
    extras_require={
        "wsi": ["openslide-python>=1.3", "openslide-bin>=4.0", "tiffslide>=2.4", "tifffile", "imagecodecs"],
        "gpu": ["xformers", "faiss-gpu-cu12"],
        "slurm": ["submitit>=1.5"],
        "umap": ["umap-learn"],  # the report's embedding map (PCA without it)
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["dinov2-patho = dinov2_patho.cli:main"]},
)
