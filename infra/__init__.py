"""What every process shares, whatever its role: settings (the only reader of the environment),
finding or starting the database and migrating it, and JSON logging.

May import `db` (migrations, the embedded server) and `domain`; never `service`, `projections`,
`inference`, `usecases` or `cli`, which all build on it.
"""
