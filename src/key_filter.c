/*-------------------------------------------------------------------------
 *
 * key_filter.c
 *	  A bloom filter in shared memory over the keys known to exist in D365
 *	  (d365inv.remote_key).  It answers "certainly not a known key"; once
 *	  refresh_remote_keys() has read all of a target's keys (and within the
 *	  key retention) that means "certainly not in D365", so that preflight
 *	  'always' looks up only the keys that may be there.
 *
 * Keys enter through a row trigger on remote_key (whoever inserts: the
 * worker, refresh_remote_keys()); the worker rebuilds the filter from the
 * table when it starts, since a bloom filter cannot forget keys that the
 * retention removed.  Bits are set with atomic OR, so readers and writers
 * need no lock; a key added by a transaction that then aborts only costs
 * a false positive.  Until a rebuild is complete the filter says "maybe"
 * to everything.
 *
 * A rebuild must not lose a key whose trigger ran before the clear but
 * whose transaction commits after the rebuild's scan took its snapshot:
 * its bits are gone and the scan does not see the row, so once ready the
 * filter would call a key D365 has "certainly absent".  So
 * key_filter_clear() waits, after clearing, for every transaction that
 * holds a lock on remote_key that an insert takes (as CREATE INDEX
 * CONCURRENTLY waits for writers), and the caller scans with a snapshot
 * taken after that: a key added before the clear is then either committed
 * and seen by the scan, or aborted; a key added after the clear set its
 * bits in the cleared array.  The price: the rebuild (at the worker's
 * start and after a failed round) waits for open transactions that wrote
 * remote_key, e.g. a resolve() in a session left idle in transaction.
 *
 * Sized at server start: d365inv.key_filter_size (memory) and
 * d365inv.key_filter_false_positive_rate (sets the number of hash
 * functions and, with the size, the capacity).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "commands/dbcommands.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "d365inv.h"

typedef struct KeyFilter
{
	uint64		nbits;
	int			nhashes;
	pg_atomic_uint32 ready;
	pg_atomic_uint64 keys_added;
	pg_atomic_uint64 bits_set;
	pg_atomic_uint32 words[FLEXIBLE_ARRAY_MEMBER];
} KeyFilter;

static KeyFilter *filter = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

PG_FUNCTION_INFO_V1(d365inv_key_filter_status);
PG_FUNCTION_INFO_V1(d365inv_key_filter_trigger);

static uint64
filter_bits(void)
{
	/* a multiple of 32, at least 1024 */
	return Max((uint64) d365inv_key_filter_size_kb * 1024 * 8, 1024);
}

static Size
filter_size(void)
{
	return add_size(offsetof(KeyFilter, words),
					mul_size(filter_bits() / 32, sizeof(pg_atomic_uint32)));
}

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	if (d365inv_key_filter_size_kb > 0)
		RequestAddinShmemSpace(filter_size());
}

static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	if (d365inv_key_filter_size_kb <= 0)
		return;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	filter = ShmemInitStruct("d365inv key filter", filter_size(), &found);
	if (!found)
	{
		double		p = d365inv_key_filter_fpr;

		filter->nbits = filter_bits();
		/* optimal number of hash functions for the target rate: log2(1/p) */
		filter->nhashes = Max(1, Min(16, (int) rint(-log2(p))));
		pg_atomic_init_u32(&filter->ready, 0);
		pg_atomic_init_u64(&filter->keys_added, 0);
		pg_atomic_init_u64(&filter->bits_set, 0);
		for (uint64 i = 0; i < filter->nbits / 32; i++)
			pg_atomic_init_u32(&filter->words[i], 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

void
key_filter_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
}

/* Two independent 64-bit hashes of target \0 vendor_key \0 invoice_key */
static void
key_hashes(const char *target, const char *vendor_key, const char *invoice_key,
		   uint64 *h1, uint64 *h2)
{
	size_t		lt = strlen(target),
				lv = strlen(vendor_key),
				li = strlen(invoice_key);
	char	   *buf = palloc(lt + lv + li + 3);

	memcpy(buf, target, lt + 1);
	memcpy(buf + lt + 1, vendor_key, lv + 1);
	memcpy(buf + lt + lv + 2, invoice_key, li + 1);
	*h1 = hash_bytes_extended((unsigned char *) buf, (int) (lt + lv + li + 3), 0);
	*h2 = hash_bytes_extended((unsigned char *) buf, (int) (lt + lv + li + 3),
							  UINT64CONST(0x9e3779b97f4a7c15)) | 1;
	pfree(buf);
}

void
key_filter_add(const char *target, const char *vendor_key, const char *invoice_key)
{
	uint64		h1,
				h2;

	if (filter == NULL)
		return;
	key_hashes(target, vendor_key, invoice_key, &h1, &h2);
	for (int i = 0; i < filter->nhashes; i++)
	{
		uint64		bit = (h1 + (uint64) i * h2) % filter->nbits;
		uint32		mask = (uint32) 1 << (bit % 32);
		uint32		old = pg_atomic_fetch_or_u32(&filter->words[bit / 32], mask);

		if ((old & mask) == 0)
			pg_atomic_fetch_add_u64(&filter->bits_set, 1);
	}
	pg_atomic_fetch_add_u64(&filter->keys_added, 1);
}

/* false: certainly not a known key.  true: maybe (or no usable filter). */
bool
key_filter_maybe(const char *target, const char *vendor_key, const char *invoice_key)
{
	uint64		h1,
				h2;

	if (!key_filter_usable())
		return true;
	key_hashes(target, vendor_key, invoice_key, &h1, &h2);
	for (int i = 0; i < filter->nhashes; i++)
	{
		uint64		bit = (h1 + (uint64) i * h2) % filter->nbits;

		if ((pg_atomic_read_u32(&filter->words[bit / 32]) & ((uint32) 1 << (bit % 32))) == 0)
			return false;
	}
	return true;
}

bool
key_filter_usable(void)
{
	return filter != NULL && d365inv_key_filter_enabled && pg_atomic_read_u32(&filter->ready) != 0;
}

/*
 * Start a rebuild: empty, and "maybe" to everything until key_filter_ready().
 * Returns once every transaction that may have added a key before the clear
 * has ended (see the header comment): the caller must read remote_key with
 * a snapshot taken after this returns (GetLatestSnapshot()).
 */
void
key_filter_clear(void)
{
	Oid			nsp;
	Oid			relid;
	LOCKTAG		tag;

	if (filter == NULL)
		return;
	pg_atomic_write_u32(&filter->ready, 0);
	pg_memory_barrier();
	for (uint64 i = 0; i < filter->nbits / 32; i++)
		pg_atomic_write_u32(&filter->words[i], 0);
	pg_atomic_write_u64(&filter->keys_added, 0);
	pg_atomic_write_u64(&filter->bits_set, 0);
	pg_memory_barrier();

	/*
	 * Inserters hold RowExclusiveLock on remote_key from before their
	 * trigger runs until they commit or abort; ShareLock conflicts with it.
	 * WaitForLockers() waits for the holders of this moment only (never for
	 * ourselves) and takes no lock, so new inserters are not held up.
	 */
	nsp = get_namespace_oid("d365inv", true);
	relid = OidIsValid(nsp) ? get_relname_relid("remote_key", nsp) : InvalidOid;
	if (!OidIsValid(relid))
		return;
	SET_LOCKTAG_RELATION(tag, MyDatabaseId, relid);
	WaitForLockers(tag, ShareLock, false);
}

void
key_filter_ready(void)
{
	if (filter == NULL)
		return;
	pg_memory_barrier();
	pg_atomic_write_u32(&filter->ready, 1);
}

/* AFTER INSERT row trigger on d365inv.remote_key */
Datum
d365inv_key_filter_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	HeapTuple	tup;
	char	   *values[3];

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		elog(ERROR, "key_filter_trigger must be a row trigger");
	desc = RelationGetDescr(trigdata->tg_relation);
	tup = trigdata->tg_trigtuple;
	for (int i = 0; i < 3; i++)
	{
		values[i] = SPI_getvalue(tup, desc, i + 1);
		if (values[i] == NULL)
			return PointerGetDatum(tup);
	}
	key_filter_add(values[0], values[1], values[2]);
	return PointerGetDatum(tup);
}

/* key_filter_status(): one row describing the filter */
Datum
d365inv_key_filter_status(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[9];
	bool		nulls[9] = {0};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "key_filter_status must return a record");
	/* one filter per server, for the database the worker serves */
	if (filter != NULL && d365inv_database != NULL &&
		strcmp(get_database_name(MyDatabaseId), d365inv_database) != 0)
	{
		ereport(WARNING,
				(errmsg("the d365inv worker serves database \"%s\", not this one: no key filter here",
						d365inv_database),
				 errhint("Set d365inv.database = '%s' in postgresql.conf and restart the server to serve this database instead.",
						 get_database_name(MyDatabaseId))));
		for (int i = 0; i < 9; i++)
			nulls[i] = true;
		values[8] = BoolGetDatum(false);
		nulls[8] = false;
	}
	else if (filter == NULL)
	{
		for (int i = 0; i < 9; i++)
			nulls[i] = true;
		values[8] = BoolGetDatum(false);
		nulls[8] = false;
	}
	else
	{
		uint64		bits_set = pg_atomic_read_u64(&filter->bits_set);
		double		fill = (double) bits_set / (double) filter->nbits;
		/* keys the filter holds at the configured false-positive rate */
		double		capacity = (double) filter->nbits * (M_LN2 * M_LN2) / -log(d365inv_key_filter_fpr);

		values[0] = Int64GetDatum((int64) (filter->nbits / 8));
		values[1] = Int64GetDatum((int64) filter->nbits);
		values[2] = Int32GetDatum(filter->nhashes);
		values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&filter->keys_added));
		values[4] = Int64GetDatum((int64) capacity);
		values[5] = Int64GetDatum((int64) bits_set);
		values[6] = Float8GetDatum(fill);
		/* probability that an absent key finds all its bits set */
		values[7] = Float8GetDatum(pow(fill, filter->nhashes));
		values[8] = BoolGetDatum(key_filter_usable());
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
