#!/usr/bin/env python3
"""Back up an IOTstack directory: the interface of scripts/backup.sh, made safe.

    python3 backup.py [TYPE] [USER]      (see --help)

The work is done by the iotstack_backup package beside this file.
"""
from iotstack_backup.backup import main

if __name__ == "__main__":
    raise SystemExit(main())
