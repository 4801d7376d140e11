"""rl_mismatch: measure, attribute, correct and prevent the training-inference mismatch."""

import setuptools

# Versions pinned to a set that was installed and tested together (Python 3.11, CPU).
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "numpy>=2.0,<3",
    "absl-py==2.5.1",
    "ml_collections==1.1.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "jinja2>=3.1",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "grain==0.2.18",
    "reasoning-gym==0.1.25",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
]

# The peer of benchmarks/rl_loop.py (TRL's GRPOTrainer) and what it needs; none of it moves the
# torch / transformers pins below. In "test" too: the benchmark test runs the peer.
BENCH = ["trl==1.16.0", "accelerate==1.16.0", "datasets==5.2.0"]

# What `python -m experiments.notebooks` executes the colab/ notebooks with (a Jupyter kernel and its
# client). In "test" too: the tests execute the notebooks' set-up path and check the saved outputs.
NOTEBOOKS = ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"]

setuptools.setup(
    name="rl_mismatch",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["rl_mismatch", "rl_mismatch.*", "experiments", "experiments.*"]),
    install_requires=CORE,
    extras_require={
        # torch is pinned exactly: any other version pulls gigabytes of CUDA wheels.
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "transformers==5.23.0", *BENCH,
                 *NOTEBOOKS],
        "bench": ["torch==2.13.0", "transformers==5.23.0", *BENCH],
        "notebooks": NOTEBOOKS,
    },
)
