# Convenience targets; the scripts they call say what they do.
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: build install uninstall test demo

build:
	cargo build --release --locked

install:
	scripts/install.sh --prefix $(PREFIX) $(if $(DESTDIR),--destdir $(DESTDIR))

uninstall:
	scripts/uninstall.sh --prefix $(PREFIX) $(if $(DESTDIR),--destdir $(DESTDIR))

test:
	tests/run-all.sh

demo:
	scripts/demo.sh
