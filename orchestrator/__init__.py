"""cvm-backup: batch image backups for Tencent Cloud CVM."""

from __future__ import annotations

__version__ = "0.1.0"
