"""Package discovery for setuptools (everything else is in pyproject.toml): every package under
vllm_ddtree/, and vllm_ddtree.kernels from the repository's top-level kernels/ folder, which
discovery cannot find under vllm_ddtree/ by itself."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["vllm_ddtree", "vllm_ddtree.*"]) + ["vllm_ddtree.kernels"])
