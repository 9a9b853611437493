# d365inv: PGXS build.  `make && sudo make install`, then see README.md.

MODULE_big = d365inv
OBJS = \
	src/d365inv.o \
	src/settings.o \
	src/ingest_support.o \
	src/target.o \
	src/batch_request.o \
	src/batch_response.o \
	src/classify.o \
	src/wire_sql.o \
	src/http.o \
	src/auth.o \
	src/worker_ctl.o \
	src/worker.o \
	src/deliver.o \
	src/request.o \
	src/queue.o \
	src/decide.o \
	src/send.o \
	src/lookup.o \
	src/odata_page.o \
	src/key_filter.o \
	src/refresh.o \
	src/alerts.o \
	src/entity_id.o \
	src/lifecycle.o \
	src/app_user.o \
	src/target_status.o

EXTENSION = d365inv
DATA = d365inv--0.1.sql d365inv--0.2.sql d365inv--0.1--0.2.sql

# pg_regress suite (sql/, expected/); run against a live cluster by test/run-all
REGRESS = schema ingest privileges wire operations guest

PG_CONFIG ?= pg_config
PG_CPPFLAGS = -I$(srcdir)/src
# -Wextra, minus the classes PostgreSQL's own headers trip over
PG_CFLAGS = -Wextra -Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers
SHLIB_LINK = -lcurl -lcjson

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS tracks only .c files: rebuild every object when any of our headers
# changes (a changed struct in one object and not another corrupts memory)
$(OBJS): $(wildcard $(srcdir)/src/*.h)
