"""cemnet: self-supervised pretraining for volume electron microscopy.

Four jobs, one direction of data flow:
curate (``curation``) -> pretrain (``cemnet.methods``) -> transfer (``cemnet.transfer``)
-> benchmark (``cemnet.benchmarks``).
"""

__version__ = "0.1.0"
