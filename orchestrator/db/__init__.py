"""The database layer: DSNs, the embedded server, the pool, the migrator and the queries.

Modules: `dsn` (parse and redact), `embedded` (a private Postgres under CVM_BACKUP_HOME), `pool`
(connections), `migrate` (numbered SQL files), `policies` (policy table queries).
"""

from __future__ import annotations
