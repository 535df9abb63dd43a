"""Evaluation of frozen features: k-NN, linear probes, dense nearest-neighbour retrieval, box-conditioned inference.

Library code only: the CLI (`odis eval ...`) wires these; nothing here imports cli.py, pipelines/ or trainer/.
"""
