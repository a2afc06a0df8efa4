# Convenience targets; the scripts they call say what they do.
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: build install test demo

build:
	cargo build --release --locked

install:
	scripts/install.sh --prefix $(PREFIX) $(if $(DESTDIR),--destdir $(DESTDIR))

test:
	tests/run-all.sh

demo:
	scripts/demo.sh
