"""`cvm-backup demo`: the whole job on a laptop, with nothing installed but this package.

An embedded Postgres in a temporary directory, the CVM API simulator in-process on loopback with
a sample fleet that misbehaves in every way a real one does, two sample policies, and the real
engine (scheduler, dispatcher, tracker, rotation) driven through two schedule slots. A live view
shows progress; a summary and the simulator's invariant checks end it.

Modules: `scenario` (fleet, faults, quota, policies), `workspace` (temporary home and the
embedded server), `progress` (the live view), `report` (summary and invariants), `runner`
(the two slots, start to clean-up).
"""

from __future__ import annotations
