"""End-to-end tests of the backup engine: real Postgres, the real simulator, faults on."""
