"""Support code shared by the tests and the benchmarks: a throwaway PostgreSQL server with migrated
template databases (`databases`), and a real service process on a free port (`live`).

For tests/ and bench/ only: the app never imports it.
"""
