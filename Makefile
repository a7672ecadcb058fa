# The two commands a fresh machine needs (both set everything up first, idempotently):
#   make demo   synthetic BraTS data -> converter -> 2-worker Horovod training -> inference
#   make test   the test suite
PYTHON := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 1
DEMO_RAW := data/raw
DEMO_DATA := data/converted

.PHONY: setup demo test clean

setup:
	./scripts/setup.sh

demo: setup
	$(PYTHON) synthetic_brats.py --out-dir $(DEMO_RAW)
	$(PYTHON) converter.py --raw-dir $(DEMO_RAW) --out-dir $(DEMO_DATA)
	./run_multinode.sh -- --data-dir $(DEMO_DATA) --output-dir runs/train
	$(PYTHON) inference.py --data-dir $(DEMO_DATA) --checkpoint runs/train/model.keras \
		--output-dir runs/inference --overwrite

test: setup
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf data runs
