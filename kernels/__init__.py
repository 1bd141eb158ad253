"""Kernels of the DDTree round, shipped as ``vllm_ddtree.kernels``: Triton kernels (GPU), and one C++
kernel for vLLM's CPU backend (``cpu_tree_attention.cpp``, built with torch's extension builder on
the machine that runs it).

Each Triton kernel module holds the ``@triton.jit`` function and nothing else; each kernel's launcher
(shapes, strides, block sizes, the C++ build) lives next to the torch reference in the
``vllm_ddtree`` module that uses it.
"""
