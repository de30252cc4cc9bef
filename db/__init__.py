"""The database adapter: SQL migrations (`db/migrations`, dbmate, applied under an advisory lock),
the asyncpg event store (appends through the `append_events` function, reads by position and by
stream), the group committer, and the embedded PostgreSQL's start-up.

May import `domain` only.
"""
