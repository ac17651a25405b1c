"""Triton Inference Server export of a bundle's tail (see `splitexit_server.triton.export`)."""
