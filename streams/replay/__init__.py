"""Replaying history through a champion and challengers, and the report it writes."""
