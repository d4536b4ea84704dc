"""The journal records what happened: syslog lines, the history file, the blocked files."""
