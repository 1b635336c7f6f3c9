# resync — two commands set everything up on a fresh machine:
#   make run    install and run the main job on a built-in sample
#   make test   install (with test extras and the Debian tools the tests use) and run the tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN    := .run

.PHONY: install run test bench tools bench-tools linkemu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $@

# The native kernel library (built once per machine and kernel source; a no-op
# when it exists; without a C compiler commands fall back to the Numba JIT).
install: $(STAMP)
	@$(PY) -m resync.kernels.build || true

# Debian tools the tests and benchmarks compare against (rdiff, rsync), and exFAT over FUSE (a
# case-insensitive destination for the deletion tests); installed only when missing.
tools:
	@missing=""; \
	command -v rdiff >/dev/null 2>&1 || missing="$$missing rdiff"; \
	command -v rsync >/dev/null 2>&1 || missing="$$missing rsync"; \
	command -v mount.exfat-fuse >/dev/null 2>&1 || missing="$$missing exfat-fuse"; \
	command -v mkfs.exfat >/dev/null 2>&1 || missing="$$missing exfatprogs"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The link emulator of the WAN tests and benchmarks (tests/linkemu: C, built with the
# machine's compiler; the tests that need it say why they skip where it cannot run).
linkemu:
	@$(PY) -c "import tests.linkemu as l; l.build()" 2>/dev/null || echo "linkemu: not built (no C compiler?)"

# What bench/ compares against besides rdiff and rsync: zfec and pyeclib from
# PyPI; Debian's ISA-L and liberasurecode (pyeclib's wheel also ships its own);
# openssh-server (bench_wan.py's veth step runs rsync over ssh).
bench-tools: tools
	@$(PIP) install --quiet -e '.[test,bench]'
	@dpkg -s libisal2 liberasurecode1 openssh-server >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libisal2 liberasurecode1 \
			openssh-server >/dev/null; }

# The main job on a built-in default: mirror a generated sample tree, change it,
# mirror again (recorded in a history database), show the history; then the
# delta engine on a seeded 64 MiB file.
run: install tools
	@rm -rf $(RUN) && mkdir -p $(RUN)
	$(PY) bench/gen.py tree --files 2000 --big 1 --big-size 8MB --seed 1 $(RUN)/src
	RESYNC_HISTORY=$(RUN)/history.duckdb $(VENV)/bin/resync sync -v $(RUN)/src $(RUN)/mirror
	$(PY) bench/gen.py change --fraction 0.05 --seed 2 $(RUN)/src
	RESYNC_HISTORY=$(RUN)/history.duckdb $(VENV)/bin/resync sync -v --delete --no-whole-file $(RUN)/src $(RUN)/mirror
	RESYNC_HISTORY=$(RUN)/history.duckdb $(VENV)/bin/resync verify $(RUN)/mirror
	RESYNC_HISTORY=$(RUN)/history.duckdb $(VENV)/bin/resync history
	$(PY) -c "from resync.store import History; \
	cols, rows = History('$(RUN)/history.duckdb').query('SELECT status, files_changed, bytes_written, bytes_matched, round(duration, 2) FROM runs ORDER BY started'); \
	print(cols); [print(r) for r in rows]"
	$(PY) bench/gen.py file --size 64MiB --edits 40 --seed 1 $(RUN)/basis $(RUN)/new
	$(VENV)/bin/resync signature $(RUN)/basis $(RUN)/basis.sig -v
	$(VENV)/bin/resync delta $(RUN)/basis.sig $(RUN)/new $(RUN)/new.delta -v --json
	$(VENV)/bin/resync patch $(RUN)/basis $(RUN)/new.delta $(RUN)/result -v
	cmp $(RUN)/result $(RUN)/new && echo "run: result is byte-identical to the new file"
	# offline flow: describe the mirror, pack the changes with parity, damage the bundle, apply it
	$(VENV)/bin/resync signature-tree $(RUN)/mirror -o $(RUN)/mirror.sig -v
	$(PY) bench/gen.py change --fraction 0.02 --seed 3 $(RUN)/src
	RESYNC_HISTORY=$(RUN)/history.duckdb $(VENV)/bin/resync pack $(RUN)/src --against $(RUN)/mirror.sig -o $(RUN)/changes.bundle -v
	$(PY) -c "import os; f = os.open('$(RUN)/changes.bundle', os.O_RDWR); os.pwrite(f, bytes(4096), 100000); os.close(f)"
	$(VENV)/bin/resync verify $(RUN)/changes.bundle || echo "run: bundle damaged (exit $$?), repairable from parity"
	RESYNC_HISTORY=$(RUN)/history.duckdb $(VENV)/bin/resync unpack $(RUN)/changes.bundle $(RUN)/mirror -v
	rsync -a --delete -n -i -c $(RUN)/src/ $(RUN)/mirror/ | grep . && exit 1 || echo "run: mirror equals the source (rsync -c finds nothing to do)"
	# over the network: a second "site" serves a module on loopback (its own key), this one pushes
	# the tree to it, changes it, pushes again, then pulls the module back into a restore directory
	@set -e; A="env XDG_CONFIG_HOME=$(RUN)/site-a RESYNC_HISTORY=$(RUN)/history.duckdb $(VENV)/bin/resync"; \
	B="env XDG_CONFIG_HOME=$(RUN)/site-b RESYNC_HISTORY=$(RUN)/site-b-history.duckdb $(VENV)/bin/resync"; \
	CLIENT=$$($$A id); SERVER=$$($$B id); mkdir -p $(RUN)/site-b-backup; \
	echo "run: this site is $$CLIENT, the server site is $$SERVER"; \
	$$B serve --listen 127.0.0.1:0 --module backup=$(RUN)/site-b-backup --allow $$CLIENT 2>$(RUN)/serve.log & \
	BPID=$$!; trap "kill $$BPID 2>/dev/null" EXIT; \
	for i in $$(seq 100); do grep -q listening $(RUN)/serve.log && break; sleep 0.1; done; cat $(RUN)/serve.log; \
	PORT=$$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' $(RUN)/serve.log); \
	URL=resync://127.0.0.1:$$PORT/backup/photos; \
	echo "+ resync sync -v $(RUN)/src $$URL --peer-id $$SERVER"; $$A sync -v $(RUN)/src $$URL --peer-id $$SERVER; \
	$(PY) bench/gen.py change --fraction 0.05 --seed 4 $(RUN)/src; \
	echo "+ resync sync -v --delete $(RUN)/src $$URL"; $$A sync -v --delete $(RUN)/src $$URL --peer-id $$SERVER; \
	echo "+ resync sync -v --transport quic $$URL $(RUN)/restore"; $$A sync -v --transport quic $$URL $(RUN)/restore --peer-id $$SERVER; \
	rsync -a --delete -n -i -c $(RUN)/src/ $(RUN)/restore/ | grep . && exit 1 || echo "run: pushed over TLS on TCP (loopback: auto picks it), pulled back over QUIC, the restore equals the source (rsync -c)"; \
	$$A verify $(RUN)/restore; \
	echo "run: this site's daemon takes a transfer of its own through its API and the run follows its events"; \
	$$A serve --listen 127.0.0.1:0 --api 127.0.0.1:0 --module outbox=$(RUN)/src --read-only outbox --allow $$SERVER \
		2>$(RUN)/serve-a.log & \
	APID=$$!; trap "kill $$BPID $$APID 2>/dev/null" EXIT; \
	for i in $$(seq 100); do grep -q listening $(RUN)/serve-a.log && break; sleep 0.1; done; cat $(RUN)/serve-a.log; \
	echo "+ resync transfer add --wait --priority high $(RUN)/src $${URL%/photos}/daemon"; \
	$$A transfer add --wait --priority high $(RUN)/src $${URL%/photos}/daemon --peer-id $$SERVER; \
	echo "+ resync transfer list"; $$A transfer list; echo "+ resync status"; $$A status; \
	rsync -a --delete -n -i -c $(RUN)/src/ $(RUN)/site-b-backup/daemon/ | grep . && exit 1 || echo "run: the daemon's transfer completed, the copy equals the source (rsync -c)"; \
	echo "run: site B goes offline; a third site relays (store and forward) what this site sends it meanwhile"; \
	kill $$BPID; wait $$BPID 2>/dev/null || true; \
	R="env XDG_CONFIG_HOME=$(RUN)/site-r $(VENV)/bin/resync"; RELAY=$$($$R id); $$B id --card > $(RUN)/site-b.card; \
	$$R serve --listen 127.0.0.1:0 --no-api --relay $(RUN)/relay-spool --relay-allow $$CLIENT --relay-allow $$SERVER \
		2>$(RUN)/serve-r.log & \
	RPID=$$!; trap "kill $$APID $$RPID 2>/dev/null" EXIT; \
	for i in $$(seq 100); do grep -q listening $(RUN)/serve-r.log && break; sleep 0.1; done; cat $(RUN)/serve-r.log; \
	RURL=resync://127.0.0.1:$$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' $(RUN)/serve-r.log); \
	$(PY) bench/gen.py change --fraction 0.05 --seed 5 $(RUN)/src; \
	echo "+ resync sync -v --delete $(RUN)/src $${URL%/photos}/relayed --via $$RURL --card @site-b.card ..."; \
	$$A sync -v --delete --retry-for 0 $(RUN)/src $${URL%/photos}/relayed --peer-id $$SERVER --via $$RURL --via-id $$RELAY \
		--card @$(RUN)/site-b.card; \
	echo "+ ls the relay's spool (sealed envelopes: ids, no names)"; ls -l $(RUN)/relay-spool/envelopes; \
	echo "+ (site B, back online) resync relay receive $$RURL --module backup=... --allow $$CLIENT"; \
	$$B relay receive $$RURL --peer-id $$RELAY --module backup=$(RUN)/site-b-backup --allow $$CLIENT; \
	rsync -a --delete -n -i -c $(RUN)/src/ $(RUN)/site-b-backup/relayed/ | grep . && exit 1 || echo "run: mirrored through the relay while site B was offline; the copy equals the source (rsync -c)"; \
	echo "+ resync relay receive $$RURL (this site: the receipt)"; $$A relay receive $$RURL --peer-id $$RELAY; \
	echo "+ resync relay status"; $$A relay status

# The sync, unpack, bundle and network tests run once more as an ordinary user
# (permission bits apply; owners cannot be set): as root, tests/as-user.sh runs
# them as nobody.
USER_TESTS := tests/test_sync.py tests/test_bundle.py tests/test_permissions.py tests/test_times.py tests/test_net.py \
	tests/test_net_tcp.py

test: install tools linkemu
	$(PY) -m pytest -q
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest -q -m nojit -W "ignore:overflow encountered:RuntimeWarning" tests/test_kernels.py tests/test_erasure.py
	bash tests/as-user.sh $(abspath $(PY)) $(USER_TESTS)

bench: install bench-tools linkemu
	$(PY) bench/bench_delta.py
	$(PY) bench/bench_sync.py
	$(PY) bench/bench_erasure.py
	$(PY) bench/bench_bundle.py
	$(PY) bench/bench_net.py
	@if [ "$$(id -u)" = 0 ]; then $(PY) bench/bench_wan.py; \
	else echo "bench_wan.py: needs root (network namespaces for the emulated link): skipped"; fi

clean:
	rm -rf $(VENV) $(RUN) bench/.data .pytest_cache .hypothesis
