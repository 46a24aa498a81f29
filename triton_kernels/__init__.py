"""Triton kernels of meprop (installed as ``meprop_triton``). Not implemented yet: importing fails."""

raise ImportError("meprop's Triton kernels are not implemented yet")
