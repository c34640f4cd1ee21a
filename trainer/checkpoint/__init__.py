"""Crash-safe checkpoints: the store (`step-N/` directories on any filesystem, a COMMITTED marker
written last with each file's checksum), the manager that saves and restores every component, and
re-partitioning of ZeRO state for a resume at another world size."""
