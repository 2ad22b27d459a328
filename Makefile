# Two commands for a fresh machine (Python 3.10+ and the package index are all they need):
#   make demo   train CMSA-S on the embedded digits data set, evaluate, save a Hub-ready folder, reload, predict
#   make test   run the test suite, the strict docs build and the snippets of README.md and docs/
# Both create .venv with the pinned CPU build of torch (constraints.txt) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests README.md docs

# The main job: CMSA-S on scikit-learn's digits upsampled to 16x16, with a plain recipe (no mixup, no flips:
# digits are not mirror-symmetric), then a reload check of the Hub-ready folder.
DEMO_DIR ?= outputs/digits-cmsa-s
demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/image-classification/run_classification.py \
		--dataset_name digits --variant cmsa-s --image_size 16 16 --output_dir $(DEMO_DIR) \
		--num_train_epochs 9 --num_warmup_epochs 1 --per_device_train_batch_size 32 --learning_rate 3e-3 \
		--mixup_alpha 0 --cutmix_alpha 0 --label_smoothing 0 --hflip_probability 0 --crop_padding 2 \
		--random_erasing_probability 0 --drop_path_rate 0 --channels_last --reparameterize_on_save
	HF_HUB_OFFLINE=1 $(PY) examples/image-classification/predict.py $(DEMO_DIR) --dataset_name digits

clean:
	rm -rf $(VENV) outputs
