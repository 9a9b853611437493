"""The statements whose cost must not grow with the settled history: what
the worker runs periodically (src/alerts.c, the housekeeping in
src/worker.c, src/target_status.c) and the reporting views and functions a
DBA or a scraper reads.  test_history_plans.py checks their plans on a
large history; bench/history times them.

Each entry: name -> (sql, write).  write: a statement that changes rows, run
inside a transaction that is rolled back.  The alert queries are those of
alerts.c with the select list cut down to what decides the plan.
"""

# the worker's periodic statements
WORKER = {
    "alert duplicate_rate":
        ("SELECT target, healthy, duplicate_rate, duplicates, received FROM d365inv.duplicate_rate"
         " WHERE period = '1h' AND target IS NOT NULL", False),
    "alert errors":
        ("SELECT target, errors, batches FROM d365inv.batch_health"
         " WHERE period = '1h' AND target IS NOT NULL", False),
    "alert auth":
        ("SELECT target, NOT firing, figures::text, message, detail"
         "  FROM d365inv.target_alerts WHERE alert = 'auth'", False),
    "alert blocked":
        ("SELECT target, NOT firing, figures::text, message, detail"
         "  FROM d365inv.target_alerts WHERE alert = 'blocked'", False),
    "alert queue_age":
        ("SELECT target, NOT firing, figures::text, message, detail"
         "  FROM d365inv.target_alerts WHERE alert = 'queue_age'", False),
    "housekeeping unknown targets":
        ("UPDATE d365inv.invoice i SET status = 'review', updated_at = now(),"
         "       settled_at = now(), last_error = 'target \"' || i.target || '\" does not exist in d365inv.target'"
         " WHERE i.status < 'created' AND i.status <> 'in_flight'"
         "   AND i.target IN (WITH RECURSIVE t(name) AS ("
         "         (SELECT target FROM d365inv.invoice WHERE status < 'created' ORDER BY target LIMIT 1)"
         "         UNION ALL"
         "         SELECT (SELECT target FROM d365inv.invoice"
         "                  WHERE status < 'created' AND target > t.name ORDER BY target LIMIT 1)"
         "           FROM t WHERE t.name IS NOT NULL)"
         "       SELECT name FROM t WHERE name IS NOT NULL"
         "          AND name NOT IN (SELECT name FROM d365inv.target))", True),
    "retention batch_log":
        ("DELETE FROM d365inv.batch_log WHERE ctid = ANY (ARRAY(SELECT ctid FROM d365inv.batch_log"
         " WHERE started_at < now() - interval '2592000 seconds' ORDER BY started_at LIMIT 10000))", True),
    "retention remote_key":
        ("DELETE FROM d365inv.remote_key WHERE ctid = ANY (ARRAY(SELECT ctid FROM d365inv.remote_key"
         " WHERE seen_at < now() - interval '172800 seconds' ORDER BY seen_at LIMIT 10000))", True),
    "retention status_change":
        ("DELETE FROM d365inv.status_change WHERE ctid = ANY (ARRAY(SELECT ctid FROM d365inv.status_change"
         " WHERE changed_at < now() - interval '31536000 seconds' ORDER BY changed_at LIMIT 10000))", True),
    # reads d365inv.tally whole: the rows of the last minute
    "compact counters": ("SELECT d365inv.compact_tally()", True),
    "targets to serve":
        ("SELECT name, enabled AND service_root IS NOT NULL, enabled,"
         "       (SELECT i.id FROM d365inv.invoice i WHERE i.target = t.name AND i.status < 'created'"
         "         ORDER BY i.next_attempt_at NULLS FIRST, i.id LIMIT 1) IS NOT NULL"
         "  FROM d365inv.target t ORDER BY name", False),
    # d365inv_submit(wait): the last invoice open at its start; whether what
    # it waits for is still open; its result
    "submit start":
        ("SELECT max(id) FROM d365inv.invoice i WHERE i.status < 'created'", False),
    "submit result":
        ("SELECT i.status::text, count(*) FROM d365inv.invoice i"
         " WHERE i.id = ANY (ARRAY(SELECT j.id FROM d365inv.invoice j"
         "                         WHERE j.id > (SELECT max(id) - 100 FROM d365inv.invoice)"
         "                           AND j.line_id BETWEEN 1 AND 1000"
         "                         UNION ALL"
         "                         SELECT j.id FROM d365inv.invoice j WHERE j.status < 'created' AND j.id <= 1000"
         "                         UNION ALL"
         "                         SELECT c.invoice_id FROM d365inv.status_change c"
         "                         WHERE c.changed_at >= now() - interval '1 minute' AND c.invoice_id <= 1000))"
         "   AND (i.line_id BETWEEN 1 AND 1000"
         "        OR (i.id <= 1000 AND (i.updated_at >= now() - interval '1 minute' OR i.status < 'created')))"
         " GROUP BY i.status ORDER BY i.status", False),
    "submit waits":
        ("SELECT (SELECT i.id FROM d365inv.invoice i"
         "         WHERE i.status < 'created' AND (i.id <= 1000 OR i.line_id BETWEEN 1 AND 1000)"
         "         ORDER BY i.target, i.next_attempt_at NULLS FIRST, i.id LIMIT 1) IS NULL", False),
    "tell waiting":
        ("UPDATE d365inv.invoice SET last_error = 'x'"
         " WHERE id = ANY (ARRAY(SELECT id FROM d365inv.invoice"
         "               WHERE target = 'default' AND status < 'created'"
         "               ORDER BY next_attempt_at NULLS FIRST, id LIMIT 1000))"
         "   AND status::text IN ('pending', 'retry')"
         "   AND last_error IS DISTINCT FROM 'x'", True),
}

# the reporting views and functions
REPORTING = {
    "duplicate_rate 1h": ("SELECT * FROM d365inv.duplicate_rate WHERE period = '1h'", False),
    "duplicate_rate 24h": ("SELECT * FROM d365inv.duplicate_rate WHERE period = '24h'", False),
    "batch_health 1h": ("SELECT * FROM d365inv.batch_health WHERE period = '1h'", False),
    "batch_health 24h": ("SELECT * FROM d365inv.batch_health WHERE period = '24h'", False),
    "queue": ("SELECT * FROM d365inv.queue", False),
    "review_queue": ("SELECT * FROM d365inv.review_queue", False),
    "target_status": ("SELECT * FROM d365inv.target_status", False),
    "progress": ("SELECT * FROM d365inv.progress", False),
    "target_alerts": ("SELECT * FROM d365inv.target_alerts", False),
    "load_lines last hour":
        ("SELECT * FROM d365inv.load_lines WHERE loaded_at >= now() - interval '1 hour'", False),
    "status_change of an invoice":
        ("SELECT * FROM d365inv.status_change WHERE invoice_id = 12345", False),
    # the whole history's figures (period 'all', invoices per status) come
    # from the counters, d365inv.tally; metrics() also exports batch_health
    # 'all', which reads what batch_log holds (batch_log_retention)
    "duplicate_rate all": ("SELECT * FROM d365inv.duplicate_rate", False),
    "metrics()": ("SELECT d365inv.metrics()", False),
}

# whole-history figures: they read everything by definition (period 'all'
# of batch_log: d365inv.batch_log_retention, 30 days); timed, not required
# to be cheap
WHOLE_HISTORY = {
    "batch_health all": ("SELECT * FROM d365inv.batch_health", False),
}

# tables whose size is the history: a periodic or windowed statement must
# not read any of them whole
HISTORY_TABLES = ("invoice", "duplicate", "reject", "batch_log", "remote_key", "status_change")


def plan_nodes(plan):
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def full_scans(plans):
    """The history tables the plans read whole (sequential scans that ran,
    or would run when not analysed), as 'table (rows)'; rows: actual rows
    when analysed, else estimated."""
    out = []
    for plan in plans:
        for node in plan_nodes(plan):
            if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in HISTORY_TABLES \
                    and node.get("Actual Loops", 1) > 0:
                rows = node.get("Actual Rows", node.get("Plan Rows"))
                out.append("%s (%s)" % (node["Relation Name"], rows))
    return out


def explain(conn, sql, write, analyze=True):
    """(execution ms or None, plans) of one statement: its own plan and,
    through auto_explain, those of the statements the functions it calls
    run (lines_received(), metrics(), ...).  A write is rolled back."""
    import json
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("LOAD 'auto_explain'")
        cur.execute("SET auto_explain.log_min_duration = 0")
        cur.execute("SET auto_explain.log_nested_statements = on")
        cur.execute("SET auto_explain.log_analyze = %s" % ("on" if analyze else "off"))
        cur.execute("SET auto_explain.log_timing = off")
        cur.execute("SET auto_explain.log_format = 'json'")
        cur.execute("SET client_min_messages = log")
        del conn.notices[:]
        cur.execute("BEGIN")
        try:
            cur.execute("EXPLAIN (%sFORMAT JSON) %s" % ("ANALYZE, " if analyze else "", sql))
            out = cur.fetchone()[0][0]
        finally:
            cur.execute("ROLLBACK")
            cur.execute("RESET client_min_messages")
    plans = [out["Plan"]]
    for notice in conn.notices:
        start = notice.find("{")
        if "plan:" in notice and start >= 0:
            plans.append(json.loads(notice[start:])["Plan"])
    del conn.notices[:]
    return out.get("Execution Time"), plans
