"""Tests of the optional integrations."""
