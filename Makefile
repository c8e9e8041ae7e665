# Every target sets up what is missing first, so each works on a fresh clone.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-faults demo bench base-model base-eval video-model lint clean

setup:  ## create .venv, install vLLM (cpu by default; FLAVOR=gpu for CUDA), redis-server and the project
	bash scripts/setup.sh

.venv/bin/python:
	bash scripts/setup.sh

test: setup  ## lint, then the whole test suite (unit, integration, e2e); set-up is a no-op when up to date
	$(PY) -m ruff check .
	@# The light tests on two workers, then the ones that start vLLM, Ray or a benchmark one at a time, their 20
	@# slowest listed (exit 5: none selected, e.g. PYTEST_ARGS names a light file only).
	$(PY) -m pytest -n 2 -m "not slow and not heavy" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m "slow or heavy" --durations=20 $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: setup  ## the inner loop: unit tests and the integration tests that start no vLLM, Ray or benchmark (two workers)
	$(PY) -m pytest -n 2 -m "not slow and not heavy" $(PYTEST_ARGS)

test-faults: .venv/bin/python  ## the fault-injection suite alone: kill -9 / restart each service mid-run, tamper a weight blob, feed bad task lines; prints the ledger table (about 7 min)
	$(PY) -m pytest -m faults tests/faults $(PYTEST_ARGS)

demo: setup  ## the main job: a Sparsity Forcing run on the tiny model, end to end (DEMO_ARGS="--set learner.max_steps=5")
	$(PY) -m learner.demo $(DEMO_ARGS)

bench: .venv/bin/python  ## run every benchmark; each prints a table and writes bench/results/*.json
	$(PY) bench/queue_throughput.py
	$(PY) bench/reward_server.py
	$(PY) bench/pruning.py
	$(PY) bench/rollout_worker.py
	$(PY) bench/weight_sync.py
	$(PY) bench/vs_trl.py
	$(PY) bench/learner_step.py

base-model: .venv/bin/python  ## rebuild the bundled tiny base model (SFT on the bundled tasks) into assets/
	$(PY) -m learner.sft --out assets/tiny-qwen25vl

base-eval: .venv/bin/python  ## re-evaluate the bundled base model (committed and fresh test splits, sf-eval's evaluator) and rewrite its eval_report.json, without retraining
	$(PY) -m learner.base_eval --model assets/tiny-qwen25vl

video-model: .venv/bin/python  ## fine-tune the bundled base model on the moving-digit videos (learner/sft_video.py: all weights, then the decoder grounded by temporal slot; about 55 min) into assets/tiny-qwen25vl-video; builds the video splits it needs
	OMP_NUM_THREADS=1 $(PY) -m learner.sft_video --out assets/tiny-qwen25vl-video

lint: .venv/bin/python
	$(PY) -m ruff check .

clean:
	rm -rf .pytest_cache .ruff_cache runs
