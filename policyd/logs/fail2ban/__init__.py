"""fail2ban compatibility: filter.d filters read and run by policyd's own code.

config.py reads the files, dates.py cuts the time out of a line, engine.py
matches (the daemon's path), with connections.py (sshd's connection cache) and
multiline.py (the maxlines window); offline.py scans whole files for
test-filter; jails.py turns jail.conf and jail.local into policy lines.
No fail2ban code is used.
"""
