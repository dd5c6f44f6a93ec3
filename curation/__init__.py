"""Curation: raw vEM archives -> deduplicated, filtered 8-bit 2D patch corpus with provenance.

Stages (data flows one way): readers -> uint8 -> slices -> patches -> hashes -> dedup groups
-> filter -> corpus writer + report.
"""
