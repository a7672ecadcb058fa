# The two commands a fresh machine needs (both set everything up first, idempotently):
#   make demo   synthetic BraTS data -> converter -> 2-worker Horovod training -> inference
#   make test   the test suite
PYTHON := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 1
# The demo's own folders: settings.py's defaults (data/raw, data/converted, runs/train) are
# where a user's real BraTS cases and runs live, with the same case IDs as the synthetic ones.
# Nothing the demo writes or `clean` deletes is outside data/demo and runs/demo.
DEMO_RAW := data/demo/raw
DEMO_DATA := data/demo/converted
DEMO_TRAIN := runs/demo/train
DEMO_INFERENCE := runs/demo/inference
DEMO_EPOCHS := 6  # settings.EPOCHS is 12: the demo trains half of the recipe to stay quick

.PHONY: setup demo test clean bench-training bench-precision test-multihost test-engines \
	bench-multihost bench-allreduce

setup:
	./scripts/setup.sh

demo: setup
	$(PYTHON) synthetic_brats.py --raw-dir $(DEMO_RAW)
	$(PYTHON) converter.py --raw-dir $(DEMO_RAW) --data-dir $(DEMO_DATA)
	./run_multinode.sh -- --data-dir $(DEMO_DATA) --train-dir $(DEMO_TRAIN) --epochs $(DEMO_EPOCHS)
	$(PYTHON) inference.py --data-dir $(DEMO_DATA) --train-dir $(DEMO_TRAIN) \
		--inference-dir $(DEMO_INFERENCE) --overwrite

test: setup
	$(PYTHON) -m pytest -q tests

# Training speed: plain Keras fit vs Horovod, ranks x threads, float32 vs bfloat16, memory.
bench-training: setup
	$(PYTHON) -m bench.training --json runs/bench_training.json

# bfloat16 against float32: final validation Dice and speed, trained as the demo trains.
bench-precision: setup
	$(PYTHON) -m bench.precision --json runs/bench_precision.json

# Only the tests across network-namespace hosts (root), and their throughput benchmark.
test-multihost: setup
	$(PYTHON) -m pytest -q -m multihost tests

# Only the launches through real cluster engines: mpirun and horovodrun --gloo over OpenSSH
# servers on namespace hosts (root; part of `make test` too).
test-engines: setup
	$(PYTHON) -m pytest -q -m engines tests

bench-multihost: setup
	$(PYTHON) -m bench.multihost --json runs/bench_multihost.json

# The gradient allreduce on rate-limited links (root), and the scaling predicted from it.
bench-allreduce: setup
	$(PYTHON) -m bench.allreduce --json runs/bench_allreduce.json

clean:
	rm -rf data/demo runs/demo
