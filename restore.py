#!/usr/bin/env python3
"""Restore an IOTstack backup: the interface of scripts/restore.sh, all or nothing.

    python3 restore.py [FILENAME] [noask]      (see --help)

The work is done by the iotstack_backup package beside this file.
"""
from iotstack_backup.restore import main

if __name__ == "__main__":
    raise SystemExit(main())
