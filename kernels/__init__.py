"""Triton kernels of the DDTree round, shipped as ``vllm_ddtree.kernels``.

Each kernel module holds the ``@triton.jit`` function and nothing else; its launcher (shapes, strides,
block sizes) lives next to the torch reference in the ``vllm_ddtree`` module that uses it.
"""
