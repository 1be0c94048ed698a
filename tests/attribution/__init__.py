"""Tests of the attribution package."""
