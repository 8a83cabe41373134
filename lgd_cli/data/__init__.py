"""Datasets: the synthetic shapes set, COCO annotation checks, detectron2 registration.

Import the submodules directly; `datasets` imports detectron2, the others do not.
"""
