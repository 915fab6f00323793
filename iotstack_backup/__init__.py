"""IOTstack backup and restore: the package behind backup.py and restore.py.

backup.py and restore.py at the top of the IOTstack directory are thin
entry points; everything they do is here, one concern per module (see the
README's "Architecture" section for the path of a backup and a restore).
"""
