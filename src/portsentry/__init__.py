"""PortSentry rebuilt in Python: notices port scans and stealth scans and shuts the scanner out."""

__version__ = "0.1.0"

# The classic version string appears in syslog lines that admins and their tools grep for.
CLASSIC_VERSION = "1.2"
