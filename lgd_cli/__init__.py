"""lgd: LGD (Label-Guided self-Distillation) detectors on detectron2, as one command-line tool."""

__version__ = "0.1.0"
