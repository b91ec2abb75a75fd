"""Probes: everything that reads hardware or the OS.

Nothing here knows about workloads or reports; every reading that cannot be
taken is an explicit `Unavailable(reason)`, never a 0 that looks like data.
"""
