"""Bytes <-> values for the vendor protocols: OTA headers, CTP frames, the description document.

This layer does no I/O, keeps no time and imports nothing from Twisted.
"""
