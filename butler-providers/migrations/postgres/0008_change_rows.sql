-- The rows a call of `apply` writes, as functions that tell the planner how many to expect.
--
-- `apply` passes its new task rows, lease ends and run statuses as JSON arrays and joins them
-- to `tasks` and `runs`. PostgreSQL expects 100 rows of any `json_to_recordset`, so for tables
-- of up to about a hundred thousand rows it scanned the whole table and hashed it for each
-- call, which a call of a few dozen rows could not repay: most of the server's time in a busy
-- engine. These functions expect ten rows, for which it looks each row up by its key. They are
-- PL/pgSQL so that PostgreSQL calls them rather than inlining them, which would drop the
-- estimate.

CREATE FUNCTION change_task_rows(new_rows json)
RETURNS TABLE (
    run_id bigint, task_id text, state text, try_number bigint, failures bigint, token bigint,
    lease_until bigint, worker text, queued_at bigint, first_started_at bigint,
    started_at bigint, ended_at bigint, next_try_at bigint, exit_code integer, error text
)
LANGUAGE plpgsql STABLE ROWS 10 AS $$
BEGIN
    RETURN QUERY SELECT * FROM json_to_recordset(new_rows) AS n (
        run_id bigint, task_id text, state text, try_number bigint, failures bigint,
        token bigint, lease_until bigint, worker text, queued_at bigint,
        first_started_at bigint, started_at bigint, ended_at bigint, next_try_at bigint,
        exit_code integer, error text);
END;
$$;

CREATE FUNCTION change_task_leases(new_rows json)
RETURNS TABLE (run_id bigint, task_id text, lease_until bigint)
LANGUAGE plpgsql STABLE ROWS 10 AS $$
BEGIN
    RETURN QUERY SELECT * FROM json_to_recordset(new_rows) AS n (
        run_id bigint, task_id text, lease_until bigint);
END;
$$;

CREATE FUNCTION change_run_rows(new_rows json)
RETURNS TABLE (
    id bigint, status text, error text, keep_started boolean, started_at bigint,
    ended_at bigint
)
LANGUAGE plpgsql STABLE ROWS 10 AS $$
BEGIN
    RETURN QUERY SELECT * FROM json_to_recordset(new_rows) AS n (
        id bigint, status text, error text, keep_started boolean, started_at bigint,
        ended_at bigint);
END;
$$;
