"""Verifiable task families: questions whose solver writes the worked steps, and the one answer checker."""
