# One entry point for set-up, the demo and the tests. Every target is idempotent: a second
# run reuses .venv and finishes in seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lgd-setup
# torch/torchvision: the versions this project is tested with (they lie on the CI machines' disk).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) "setuptools<81" wheel
	$(PY) scripts/install_detectron2.py
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,onnx]"
	$(VENV)/bin/lgd doctor
	touch $@

# Train LGD on the embedded synthetic data (a few CPU minutes), then print its COCO AP.
demo: setup
	$(VENV)/bin/lgd train --preset demo --output output/demo --force
	$(VENV)/bin/lgd eval output/demo/model_final.pth

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
