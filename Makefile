# Two commands do all set-up from a fresh clone:
#   make book   install into .venv, then render the book to _build/html
#   make test   install into .venv, then pytest tests/ and nbval over every notebook in chapters/
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install book test test-py test-nb clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going

# Triton kernels (later chapters) run in Triton's CPU interpreter when torch sees no GPU. The variable must
# be set before any kernel is defined, so it is set here, for pytest and the notebook kernels it starts.
INTERPRET = TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(BIN)/python -c 'import torch; print(int(not torch.cuda.is_available()))')}

test: $(STAMP)
	$(INTERPRET) $(BIN)/python -m pytest tests chapters --nbval-lax --nbval-current-env -p no:cacheprovider

test-py: $(STAMP)
	$(INTERPRET) $(BIN)/python -m pytest tests -p no:cacheprovider

test-nb: $(STAMP)
	$(INTERPRET) $(BIN)/python -m pytest chapters --nbval-lax --nbval-current-env -p no:cacheprovider

clean:
	rm -rf _build
