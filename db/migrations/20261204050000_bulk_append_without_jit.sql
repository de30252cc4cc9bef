-- migrate:up

-- append_events_in_bulk's queries join arrays by computed ordinals, which the planner cannot
-- estimate: it costs them in the billions of rows, far above jit_above_cost, so a server with JIT
-- enabled (PostgreSQL's default) compiled them with LLVM on every call. For a 10,000-label request
-- on a 2M-event log that compilation took about 240 ms of the function's 660 ms; the queries
-- themselves run in milliseconds over arrays of this size, so compiling never pays for itself here.
ALTER FUNCTION append_events_in_bulk(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[])
    SET jit = off;

-- migrate:down

ALTER FUNCTION append_events_in_bulk(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[])
    RESET jit;
