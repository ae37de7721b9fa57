"""sslocal: self-supervised sound-source localization (marginNCE) in JAX/Flax."""

from setuptools import find_packages, setup

GCS = ["gcsfs>=2026.10.1", "tensorstore>=0.1.86", "orbax-checkpoint>=0.12.8",
       "array-record>=0.8.6"]

setup(
    name="sslocal",
    version="0.1.0",
    description="Self-supervised sound-source localization (marginNCE, EZ-VSL, LVS) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sslocal", "sslocal.*"]),
    package_data={"sslocal.data": ["metadata/*"]},
    include_package_data=True,
    # Lower bounds are the versions the test suite was run with (Python 3.11, jax 0.10.2).
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "tensorstore>=0.1.69",  # imported by checkpointing.py for its JSON-leak repair
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.12",
        "array-record>=0.7.0",
        "librosa>=0.10.2",
        "scipy>=1.11",
        "ml-collections>=1.0.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10.0",
        "simplejpeg>=1.9",
        "tensorboardX>=2.6.2",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "av>=12.0",
    ],
    extras_require={
        # gs:// paths (workdirs, data_dir, models, outputs); the versions tests/test_gcs.py ran
        # with. gcsfs: epath's backend (TFDS, Orbax metadata, sslocal's files); TensorStore's GCS
        # driver: Orbax arrays; ArrayRecord's GCS reader (first in 0.8.3): the Grain loader.
        "gcs": GCS,
        # tests/test_gcs.py serves the GCS JSON API on 127.0.0.1 with gcp-storage-emulator.
        "test": ["pytest>=8.0", "pytest-xdist>=3.6", "ruff>=0.6", "chex>=0.1.88",
                 "scikit-learn>=1.4", *GCS, "gcp-storage-emulator>=2026.7.19"],
        "torch": ["torch>=2.1"],
    },
    entry_points={"console_scripts": ["sslocal=sslocal.cli:run"]},
)
